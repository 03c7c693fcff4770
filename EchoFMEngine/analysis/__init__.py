"""Clinical analysis: ``analyze(cine_or_path) -> StudyResult`` and ``python -m EchoFMEngine analyze``."""
from .batch import analyze_paths, cli
from .pipeline import StudyResult, analyze

__all__ = ["analyze", "analyze_paths", "StudyResult", "cli"]
