"""The extension's screenshot (EXTENSION_SCREENSHOTURLS): a real A4C cine frame (shared/data/echo/
a4c_sequence.nii.gz) with LV/LA masks made by threshold + grow-from-seed (no model), and their areas.

    python Resources/Screenshots/make_screenshot.py      # from the repository root; writes EchoFM-A4C.png
"""
from pathlib import Path
import numpy as np, SimpleITK as sitk
from scipy import ndimage as ndi
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "echo" / "a4c_sequence.nii.gz"

img = sitk.ReadImage(str(DATA))
a = sitk.GetArrayFromImage(img).astype(np.float32)
sp = img.GetSpacing()[0]

sector = ndi.binary_erosion(ndi.binary_fill_holes(ndi.gaussian_filter(a.max(0), 3) > 8), iterations=12)

def grow(frame, seed, thr):
    sm = ndi.gaussian_filter(frame, 5)
    lab, _ = ndi.label((sm < thr) & sector)
    if lab[seed] == 0:
        raise ValueError(f"seed {seed} is not below {thr}")
    m = lab == lab[seed]
    m = ndi.binary_opening(m, iterations=3)
    lab, _ = ndi.label(m)
    m = lab == lab[seed]
    return ndi.binary_fill_holes(m)

LV_THR, LA_THR = 72, 40
lv_seed, la_seed = (220, 330), (345, 330)
t0 = 0
lv = grow(a[t0], lv_seed, LV_THR)
right = np.zeros_like(sector); right[:, 290:] = True          # the LA, right of the interatrial septum
sector_all = sector.copy(); sector &= right
la = grow(a[t0], la_seed, LA_THR); sector = sector_all
print("LV px", lv.sum(), "LA px", la.sum())

fig = plt.figure(figsize=(9.6, 4.8), dpi=100, facecolor="#2b2b2b")
ax = fig.add_axes([0.0, 0.0, 0.6, 1.0]); ax.imshow(a[t0], cmap="gray", vmin=0, vmax=255); ax.axis("off")
for m, c in ((lv, (0.85, 0.2, 0.2)), (la, (0.2, 0.45, 0.9))):
    rgba = np.zeros((*m.shape, 4)); rgba[m] = (*c, 0.35); ax.imshow(rgba)
    ax.contour(m, levels=[0.5], colors=[c], linewidths=1.5)
ax.text(8, 20, "A4C cine, frame 1/20  (real echo, 0.4 mm/px)", color="w", fontsize=9)
ax.text(8, 470, "LV_endo (red), LA (blue): threshold + grow-from-seed masks, as drawn in the Segment Editor", color="w", fontsize=8)
bx = fig.add_axes([0.63, 0.1, 0.35, 0.8], facecolor="#2b2b2b"); bx.axis("off")
rows = [("EchoFM", ""), ("", ""), ("Input", "A4C cine, 20 frames"), ("Spacing", f"{sp:.2f} mm/px"),
        ("Frame", "1 of 20"), ("", ""), ("Masks", ""),
        ("LV_endo area", f"{lv.sum() * sp * sp / 100:.1f} cm$^2$"), ("LA area", f"{la.sum() * sp * sp / 100:.1f} cm$^2$"),
        ("", ""), ("Correct ED / ES", "Segment Editor"), ("Measure", "EDV, ESV, EF, LA vol"),
        ("Export", "fine-tuning dataset")]
for k, (name, value) in enumerate(rows):
    bx.text(0.0, 1 - k * 0.075, name, color="w", fontsize=13 if k == 0 else 10, weight="bold" if k == 0 else None,
            transform=bx.transAxes)
    bx.text(0.48, 1 - k * 0.075, value, color="#ddd", fontsize=10, transform=bx.transAxes)
import io
buf = io.BytesIO()
fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
im = Image.open(buf).convert("RGB").quantize(colors=128)
im.save(HERE / "EchoFM-A4C.png", optimize=True)
