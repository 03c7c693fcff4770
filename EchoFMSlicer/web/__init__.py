"""EchoFM in the browser: the panel's workflow served by trame-slicer over ``EchoFMSlicerLib``.

``python -m EchoFMSlicer.web [PATH ...] [--port N] [--host H] [--models DIR] [--token T]``.
All work goes through ``EchoFMSlicerLib.logic.EchoFMLogic`` on trame-slicer's MRML scene; this
package only turns browser events into its calls and draws what it returns. See docs/web.md.
"""
