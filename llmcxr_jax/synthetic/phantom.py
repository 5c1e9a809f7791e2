"""Pixels of the synthetic CXR corpus: vectorised numpy phantoms of frontal (PA/AP) and lateral
chest radiographs whose findings (heart size, effusion, pneumothorax, opacities, devices ...)
are drawn into the image. A density map is built in patient coordinates, then exposed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from PIL import Image

from llmcxr_jax.errors import UsageError

# Patient coordinates: x in [-1, 1] left to right *on the image*, so the patient's right side
# is x < 0 (radiological convention); y in [-1, 1] top to bottom. `u = |x|` folds both lungs
# onto one lateral axis so most anatomy is computed once for both sides.
LOBE_CENTRES = {"upper": (0.36, -0.42), "middle": (0.26, 0.08), "lower": (0.42, 0.28)}
ZONE_Y = {"upper": -0.45, "middle": -0.05, "lower": 0.25}
DEVICE_KINDS = ("ett", "enteric", "cvc", "picc", "pacer")


def sample_anatomy(rng: np.random.Generator) -> dict:
    """Per-subject body habitus, so follow-up studies of one patient look alike."""
    return {
        "body_w": rng.uniform(0.84, 0.96), "lung_rx": rng.uniform(0.41, 0.46), "lung_top": rng.uniform(-0.8, -0.7),
        "dome": rng.uniform(0.4, 0.48), "dome_gap": rng.uniform(0.03, 0.08), "heart_l": rng.uniform(0.27, 0.32),
        "heart_r": rng.uniform(0.08, 0.12), "heart_h": rng.uniform(0.3, 0.34), "med_w": rng.uniform(0.09, 0.11),
        "rib_sp": rng.uniform(0.118, 0.132), "soft": rng.uniform(0.55, 0.68), "air": rng.uniform(0.42, 0.5),
    }


def _sig(z):
    # A linear ramp standing in for a logistic edge of width ~4 units of z: the tanh costs 8x.
    return np.clip(z * 0.25 + 0.5, 0, 1)


def _hypot(a, b):
    return np.sqrt(a * a + b * b)


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """[size, size] float32 noise of about unit std varying over `cells` cells (bicubic upsampling)."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))


def _polyline(X, Y, pts, width: float):
    """Soft line along a polyline: exp(-(distance/width)^2), computed only in its bounding box."""
    pts = np.asarray(pts, np.float32)
    out = np.zeros_like(X)
    pad = 3 * width
    (x0, y0), (x1, y1) = pts.min(0) - pad, pts.max(0) + pad
    box = (X > x0) & (X < x1) & (Y > y0) & (Y < y1)
    if not box.any():
        return out
    px, py = X[box], Y[box]
    d2 = np.full(px.shape, np.inf, np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        vx, vy = bx - ax, by - ay
        t = np.clip(((px - ax) * vx + (py - ay) * vy) / max(vx * vx + vy * vy, 1e-9), 0, 1)
        d2 = np.minimum(d2, (px - ax - t * vx) ** 2 + (py - ay - t * vy) ** 2)
    out[box] = np.exp(-d2 / width ** 2)
    return out


def _curve(*ctrl, n: int = 9):
    """Bezier curve through control points (de Casteljau) -> [n, 2] points, for tubes and leads."""
    t = np.linspace(0, 1, n, dtype=np.float32)[:, None]
    pts = [np.asarray(p, np.float32)[None, :] for p in ctrl]
    while len(pts) > 1:
        pts = [(1 - t) * a + t * b for a, b in zip(pts[:-1], pts[1:])]
    return pts[0]


def _side_weight(X, side: str):
    if side == "right":
        return _sig(-X / 0.02)
    if side == "left":
        return _sig(X / 0.02)
    return 1.0


def _grid(size, rng, scale_mul=1.0, y_shift=0.0):
    """Pixel grid -> patient coordinates after positioning jitter (rotation, scale, shift)."""
    ang = math.radians(rng.normal(0, 2.0))
    scale = rng.uniform(0.93, 1.03) * scale_mul
    dx, dy = rng.normal(0, 0.03, 2)
    Y0, X0 = _pixel_coords(size)
    c, s = math.cos(ang), math.sin(ang)
    X = ((c * X0 + s * Y0) / scale - dx).astype(np.float32)
    Y = ((-s * X0 + c * Y0) / scale - dy + y_shift).astype(np.float32)
    return X, Y


def _pixel_coords(size):
    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(g, g, indexing="ij")


def _internal_size(size: int) -> int:
    # Anatomy is smooth: above 128 px it is drawn at 5/8 of the output size and upsampled
    # (2.5x fewer pixels to compute); grain and markers are added at full resolution.
    return size if size <= 128 else max(128, (size * 5) // 8)


class _Frontal:
    """The anatomy of one frontal film: coordinates after positioning jitter and organ shapes.
    The heart and mediastinum are one silhouette given by its half-width on each side."""

    def __init__(self, size, rng, anat, ap, heart_add, med_scale):
        self.a, self.ap = anat, ap
        self.X, self.Y = _grid(size, rng, 1.04 if ap else 1.0, 0.04 if ap else 0.0)
        self.U = np.abs(self.X)
        self.left = self.X > 0
        # AP films are taken supine/semi-erect: smaller lung volumes (higher domes), magnified heart.
        d = anat["dome"] - (0.05 if ap else 0.0)
        self.dome0 = np.where(self.left, d + anat["dome_gap"], d).astype(np.float32)
        self.med_scale = med_scale
        mag = 1.08 if ap else 1.0
        self.hl = (anat["heart_l"] + heart_add) * mag
        self.hr = (anat["heart_r"] + 0.45 * heart_add) * mag
        self.hh = anat["heart_h"] + 0.3 * heart_add
        self.cy = 0.22
        self.ry = self.cy - anat["lung_top"]

    def dome(self, U):
        return self.dome0 + 0.9 * (U - 0.36) ** 2

    def border(self, Y, left):
        """Half-width of the cardiomediastinal silhouette at height Y on the given side."""
        widen = (self.med_scale - 1) * np.exp(-((Y + 0.3) / 0.3) ** 2)
        bulge = np.sqrt(np.clip(1 - ((Y - 0.36) / self.hh) ** 2, 0, 1))
        knob = 0.06 * np.exp(-((Y + 0.36) / 0.08) ** 2)  # aortic knob on the left
        return self.a["med_w"] * (1 + widen) + np.where(left, knob + self.hl * bulge, self.hr * bulge)

    def lung_sdf(self, U, Y):
        """Approximate signed distance to one lung (negative inside), both sides at once."""
        a = self.a
        r = np.sqrt(((U - 0.37) / a["lung_rx"]) ** 2 + ((Y - self.cy) / self.ry) ** 2)
        out = (r - 1) * a["lung_rx"]
        dome = Y - (self.dome0 + 0.9 * (U - 0.36) ** 2)
        return np.maximum(np.maximum(out, dome), self.border(Y, self.left) - U)


def _ribs(F, r_cage, fracture):
    """Posterior ribs as a periodic band in a curved coordinate (all ribs in O(1) array ops);
    a fracture cuts one rib and steps the part lateral to the break."""
    U, Y, a = F.U, F.Y, F.a
    q = Y - (-0.2 * U + 0.8 * U * U)
    q = q - a["lung_top"] + 0.12
    phase = (q - 0.12 * q * q) / a["rib_sp"]  # lower ribs are spaced wider
    gap = 0.0
    if fracture is not None:
        side_w, rib, uf, step = fracture
        this_rib = (np.abs(phase - rib - 0.35) < 0.7) * side_w
        phase = phase - step * this_rib * _sig((U - uf) / 0.004)
        gap = np.exp(-((U - uf) / 0.012) ** 2) * this_rib
    f = phase - np.floor(phase)
    # a rib: soft band with brighter cortical edges
    band = (np.exp(-((f - 0.35) / 0.15) ** 2) + 0.5 * np.exp(-((f - 0.2) / 0.035) ** 2)
            + 0.5 * np.exp(-((f - 0.5) / 0.035) ** 2))
    keep = _sig(phase / 0.05) * _sig((10.6 - phase) / 0.1) * _sig((U - 0.1) / 0.01) * _sig((1.06 - r_cage) / 0.02)
    ribs = 0.085 * band * keep * (1 - 0.9 * gap)
    # anterior ribs: fainter, running down towards the sternum
    f2 = (Y + 0.55 * U - 0.15 * U * U - a["lung_top"]) / (a["rib_sp"] * 1.3)
    f2 = f2 - np.floor(f2)
    ribs += 0.045 * np.exp(-((f2 - 0.5) / 0.2) ** 2) * _sig((U - 0.25) / 0.03) * keep
    return ribs


def _drawn(findings: Mapping, label: str):
    """(Finding, strength): positive findings are drawn fully, uncertain ones at half strength."""
    f = findings.get(label)
    if f is None or f.certainty == "negative":
        return None, 0.0
    return f, (1.0 if f.certainty == "positive" else 0.5)


def render_frontal(findings: Mapping, view: str, size: int, rng: np.random.Generator, anat: Mapping) -> np.ndarray:
    """One PA or AP film -> float32 [size, size] in [0, 1]. `findings` maps CheXpert label ->
    Finding (see synthetic/text.py); only positive (full) and uncertain (faint) ones are drawn."""
    ap = view == "AP"
    out_size, size = size, _internal_size(size)
    get = lambda label: _drawn(findings, label)  # noqa: E731
    cm, cm_w = get("Cardiomegaly")
    ecm, ecm_w = get("Enlarged Cardiomediastinum")
    heart_add = cm_w * (0.12 + 0.07 * cm.severity) if cm else 0.0
    med_scale = 1.0 + (ecm_w * (0.5 + 0.3 * ecm.severity) if ecm else 0.0)
    F = _Frontal(size, rng, anat, ap, heart_add, med_scale)
    X, Y, U, a = F.X, F.Y, F.U, anat

    # body: torso below sloping shoulders, neck leaving the top of the film
    shoulder = -0.86 + 0.35 * np.maximum(U - 0.22, 0)
    barrel = a["body_w"] * (1 - 0.06 * (Y - 0.1) ** 2)
    body = _sig((barrel - U) / 0.01) * np.maximum(_sig((Y - shoulder) / 0.015), _sig((0.17 - U) / 0.01))
    # shoulders and upper arms, which hang clear of the chest wall below the axillae
    arm_top = -0.78 + 4 * np.maximum(U - a["body_w"] - 0.02, 0) ** 2
    gap = a["body_w"] + 0.04 * _sig((Y + 0.45) / 0.05)
    arm = _sig((Y - arm_top) / 0.015) * _sig((a["body_w"] + 0.15 - U) / 0.01) * _sig((U - gap) / 0.01)
    body = np.maximum(body, 0.7 * arm)
    D = body * (a["soft"] + 0.05 * _smooth_noise(rng, size, 6) + 0.1 * (U / a["body_w"]) ** 2)
    hd = _hypot((U - a["body_w"] - 0.03) / 0.11, (Y + 0.64) / 0.12)  # humeral heads
    D += 0.25 * np.sqrt(np.clip(1 - hd * hd, 0, 1))

    sdf = F.lung_sdf(U, Y)
    lung = lung_vis = _sig(-sdf / 0.005)
    dome = F.dome(U)
    abdomen = _sig((Y - dome) / 0.006) * body
    med = _sig((F.border(Y, F.left) + 0.01 - U) / 0.008)
    # the lungs are darkest centrally: less chest wall and breast tissue in front of them
    depth = np.clip(-sdf / 0.12, 0, 1)
    # heart, mediastinum and abdomen are one water-dense mass, so their silhouettes merge
    D += np.maximum(0.36 * med, 0.42 * abdomen) - a["air"] * lung * (0.8 + 0.2 * depth)
    # stomach bubble under the left dome
    D -= 0.2 * _sig((1 - _hypot((X - 0.36) / 0.11, (Y - dome - 0.1) / 0.06)) / 0.1) * (X > 0) * abdomen
    # trachea and main bronchi (air inside the mediastinum)
    tr = _sig((0.036 - np.abs(X - 0.005 - 0.02 * (Y + 1))) / 0.006) * _sig((-0.27 - Y) / 0.02)
    br = _polyline(X, Y, [(-0.15, -0.1), (0.0, -0.28), (0.16, -0.07)], 0.025)
    D -= 0.16 * np.maximum(tr, br)
    # spine: vertebral bodies faintly through the mediastinum
    D += 0.08 * _sig((0.075 - np.abs(X)) / 0.01) * (0.7 + 0.3 * np.cos(Y * (2 * np.pi / 0.105)))
    # lung markings: vessel-like ridges radiating from each hilum, thinner towards the periphery
    dx, dy = U - 0.14, Y + 0.02
    r = np.sqrt(dx * dx + dy * dy)
    # "diamond angle" in [0, 4): monotone in the true angle and 10x cheaper than arctan2
    ady = np.abs(dy) / (np.abs(dx) + np.abs(dy) + 1e-6)
    th = np.where(dx >= 0, np.where(dy >= 0, ady, 4 - ady), np.where(dy >= 0, 2 - ady, 2 + ady))
    table = np.stack([np.asarray(Image.fromarray(rng.standard_normal((24, 5)).astype(np.float32))
                                 .resize((48, 224), Image.Resampling.BICUBIC)) for _ in range(2)])
    ia = (th * (223.99 / 4)).astype(np.int32)
    ir = np.minimum(r * 47, 47).astype(np.int32)
    t = table[(X > 0).astype(np.int32), ia, ir]
    vessels = np.exp(-(t * t) / (0.07 + 0.3 * np.exp(-r / 0.2))) * np.exp(-r / 0.4)
    hilum = np.exp(-(((U - 0.19) / 0.07) ** 2 + ((Y + 0.02) / 0.14) ** 2))
    markings = 0.12 * vessels + 0.14 * hilum + 0.03 * _smooth_noise(rng, size, max(size // 12, 8))

    fr, fr_w = get("Fracture")
    fracture = None
    if fr:
        rib, uf = fr.where
        fracture = (_side_weight(X, fr.side), rib, uf, 0.15 + 0.1 * fr_w)
    r_cage = np.sqrt(((U - 0.37) / (a["lung_rx"] + 0.05)) ** 2 + ((Y - F.cy) / (F.ry + 0.08)) ** 2)
    D += _ribs(F, r_cage, fracture) * (1 - 0.7 * abdomen)
    # clavicles: higher and flatter on AP films
    yc = -0.62 - (0.07 if ap else 0.0) - (0.2 if ap else 0.32) * (U - 0.06) + 0.2 * (U - 0.06) ** 2
    clav = np.exp(-((Y - yc) / 0.032) ** 2)
    D += (0.2 * clav + 0.08 * np.exp(-((Y - yc) / 0.012) ** 2)) * _sig((U - 0.07) / 0.01) * _sig((0.78 - U) / 0.02)

    ptx, ptx_w = get("Pneumothorax")
    if ptx:
        # the collapsed lung is the lung shape shrunk towards its lower hilum; air between it
        # and the chest wall has no markings (only air: darker than aerated lung), and its edge is
        # a thin bright visceral pleural line
        k = 1 + ptx_w * (_ptx_rim(out_size) + 0.14 * ptx.severity)
        cu, cyy = 0.22, 0.3
        sdf_c = F.lung_sdf(cu + (U - cu) * k, cyy + (Y - cyy) * k) / k
        sidew = _side_weight(X, ptx.side)
        gap = lung * _sig(sdf_c / 0.004) * sidew
        markings = markings * (1 - gap)
        D += -0.3 * gap + 0.12 * np.exp(-(sdf_c / 0.005) ** 2) * lung * sidew
    D += markings * lung_vis

    ed, ed_w = get("Edema")
    if ed:
        haze = np.exp(-(((U - 0.2) / (0.2 + 0.08 * ed.severity)) ** 2 + (Y / (0.3 + 0.05 * ed.severity)) ** 2))
        D += ed_w * (0.14 + 0.08 * ed.severity) * haze * (0.8 + 0.25 * _smooth_noise(rng, size, 14)) * lung
        D += ed_w * 0.12 * vessels * lung_vis
    for label, dens, grain in (("Consolidation", 0.45, 10), ("Lung Opacity", 0.28, 18)):
        f, w = get(label)
        if f:
            cu, cyy = LOBE_CENTRES.get(f.site, LOBE_CENTRES["lower"])
            rad = 0.13 + 0.06 * f.severity
            d2 = ((U - cu) / (rad * 1.1)) ** 2 + ((Y - cyy) / rad) ** 2
            patch = np.clip(0.55 + 0.7 * _smooth_noise(rng, size, grain), 0, 1)
            D += w * dens * np.exp(-d2 * np.sqrt(d2)) * patch * lung * _side_weight(X, f.side)
    at, at_w = get("Atelectasis")
    if at:
        ya, tilt = at.where
        yl = F.dome0 - 0.08 - ya + tilt * (U - 0.45)
        plate = np.exp(-((Y - yl) / (0.014 + 0.01 * at.severity)) ** 2) * np.exp(-((U - 0.45) / 0.2) ** 4)
        D += at_w * (0.28 + 0.08 * at.severity) * plate * lung * _side_weight(X, at.side)
    le, le_w = get("Lung Lesion")
    if le:
        lu, ly = le.where
        rad = (0.03, 0.05, 0.085)[le.severity]
        sx = -1.0 if le.side == "right" else 1.0
        d = _hypot(X - sx * lu, Y - ly) / rad
        D += le_w * 0.35 * np.sqrt(np.clip(1 - d * d, 0, 1)) * lung
    pe, pe_w = get("Pleural Effusion")
    if pe:
        # fluid fills the base up to a meniscus that climbs the lateral chest wall
        h = pe_w * (0.12 + 0.15 * pe.severity)
        level = F.dome0 + 0.06 - h - 0.8 * np.maximum(U - 0.2, 0) ** 2
        fluid = _sig((Y - level) / 0.012) * lung * _side_weight(X, pe.side)
        D += 0.5 * fluid - markings * fluid * lung_vis

    sd, _ = get("Support Devices")
    if sd:
        D += 0.9 * _devices(X, Y, sd.devices, out_size)
    return _expose(D, rng, ap, out_size, marker=True)


def _expose(D, rng, ap, size, marker):
    """Density -> film brightness at `size` px: Beer-Lambert-like response, gamma, window, grain,
    and a burnt-in side marker ("L" on the patient's left, image right; portable films get a tag)."""
    if D.shape[0] != size:
        D = np.asarray(Image.fromarray(D.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
    img = 1 - np.exp(-rng.uniform(1.9, 2.5) * np.maximum(D, 0))
    img *= 1 + 0.04 * _smooth_noise(rng, size, 3)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    lo, hi = rng.uniform(0.0, 0.06), rng.uniform(0.92, 1.04)
    img = lo + (hi - lo) * img + rng.standard_normal(img.shape, np.float32) * rng.uniform(0.004, 0.018 if ap else 0.01)
    if marker:
        Y0, X0 = _pixel_coords(size)
        stem = (np.abs(X0 - 0.82) < 0.012) & (np.abs(Y0 + 0.86) < 0.05)
        foot = (np.abs(X0 - 0.845) < 0.035) & (np.abs(Y0 + 0.81) < 0.011)
        img[stem | foot] = 1.0
        if ap:
            img[(np.abs(X0 + 0.8) < 0.1) & (np.abs(Y0 + 0.88) < 0.012)] = 0.95
    return np.clip(img, 0, 1)


def _line_width(width: float, out_size: int) -> float:
    """Tubes and leads are drawn at least ~2.5 output pixels wide (full width at half maximum):
    a thinner line falls between the pixel centres of a small film, or inside one code of an f8
    VQ-GAN, and vanishes (at 64 px a catheter would be a third of a pixel wide). At 256 px the
    floor widens only the thinnest leads (PICC, pacemaker), to ~3 mm of a 35 cm film."""
    return max(width, 3.0 / out_size)


def _ptx_rim(out_size: int) -> float:
    """How much a small pneumothorax shrinks its lung (k = 1 + this): a ~1.5 cm rim, but at least
    ~4 output pixels wide at the hilum. At 64 px a 1.5 cm rim is 2 px, and an f8 VQ-GAN's codes
    lose it (a classifier reads pneumothorax off its reconstructions at AUROC 0.71; 0.99 with the
    wider rim). From 128 px up the realistic rim is the wider one."""
    return max(0.18, 19.0 / out_size)


def _devices(X, Y, kinds, out_size: int) -> np.ndarray:
    def line(pts, width):
        return _polyline(X, Y, pts, _line_width(width, out_size))

    out = np.zeros_like(X)
    for kind in kinds:
        if kind == "ett":  # endotracheal tube, tip above the carina
            out = np.maximum(out, line([(0.01, -1.1), (0.01, -0.42)], 0.012))
        elif kind == "enteric":  # down the oesophagus, through the diaphragm into the stomach
            out = np.maximum(out, line(_curve((0.03, -1.1), (0.02, 0.2), (0.05, 0.62), (0.38, 0.58)), 0.01))
        elif kind == "cvc":  # right internal jugular line ending in the SVC
            out = np.maximum(out, line(_curve((-0.3, -1.1), (-0.12, -0.7), (-0.07, -0.22)), 0.01))
        elif kind == "picc":  # from the right arm to the SVC
            out = np.maximum(out, line(_curve((-1.1, -0.62), (-0.35, -0.72), (-0.06, -0.22)), 0.008))
        elif kind == "pacer":  # left chest generator with leads to the right atrium and ventricle
            box = _sig((0.09 - np.abs(X - 0.55)) / 0.008) * _sig((0.06 - np.abs(Y + 0.62)) / 0.008)
            la = line(_curve((0.5, -0.6), (0.1, -0.75), (-0.05, -0.2), (-0.03, 0.12)), 0.008)
            lv = line(_curve((0.52, -0.6), (0.05, -0.8), (-0.02, 0.1), (0.18, 0.42)), 0.008)
            out = np.maximum(out, np.maximum(1.6 * box, np.maximum(la, lv)))
    return out


def render_lateral(findings: Mapping, size: int, rng: np.random.Generator, anat: Mapping) -> np.ndarray:
    """A simpler lateral phantom (patient facing the image left): spine, sternum, heart, domes
    and the posterior sulci. It shows heart size, effusions, edema and devices; the other
    findings are drawn on frontal films only."""
    out_size, size = size, _internal_size(size)
    X, Y = _grid(size, rng)
    # chest wall from the sternum (front, left) to the back muscles (right), arms raised in front
    body = _sig((0.95 - np.abs(X - 0.08 + 0.06 * Y)) / 0.015)
    body = np.maximum(body, _sig((1 - _hypot((X + 0.55) / 0.4, (Y + 0.95) / 0.35)) / 0.05))
    D = body * (anat["soft"] + 0.05 + 0.05 * _smooth_noise(rng, size, 6))
    dome = anat["dome"] + 0.02 + 0.5 * np.maximum(X + 0.2, 0) ** 2
    lung = _sig((1 - _hypot((X + 0.06) / 0.62, (Y - 0.15) / 0.95)) / 0.01) * _sig((dome - Y) / 0.006)
    cm, cm_w = _drawn(findings, "Cardiomegaly")
    k = 1.0 + (cm_w * (0.18 + 0.1 * cm.severity) if cm else 0.0)
    heart = _sig((1 - _hypot((X + 0.3 - 0.12 * (k - 1)) / (0.32 * k), (Y - 0.32) / (0.3 * k))) / 0.06)
    # abdomen under the domes; behind the spine the back muscles are as dense, so no edge shows there
    D += 0.45 * _sig((Y - dome) / 0.006) * _sig((0.55 - X) / 0.06) * body
    D -= 0.8 * anat["air"] * lung * (1 - 0.5 * heart)
    D += 0.3 * _sig((X - 0.55) / 0.06) * body
    D += 0.06 * np.exp(-((Y - dome + 0.02 - 0.05 * X) / 0.01) ** 2) * _sig((X + 0.3) / 0.05)  # the other dome
    # vertebral bodies with disc spaces behind the lungs, the sternum in front
    disc = np.cos((Y + 0.1 * X) * (2 * np.pi / 0.12))
    D += 0.22 * _sig((0.1 - np.abs(X - 0.5 + 0.06 * Y)) / 0.01) * _sig((disc + 0.8) / 0.1)
    D += 0.2 * _sig((0.035 - np.abs(X + 0.8 + 0.12 * Y)) / 0.01) * _sig((0.3 - Y) / 0.05) * _sig((Y + 0.7) / 0.05)
    D -= 0.14 * _polyline(X, Y, [(-0.05, -1.1), (0.1, -0.2)], 0.035)  # trachea
    D += (0.04 * _smooth_noise(rng, size, max(size // 12, 8)) + 0.12 * np.exp(-((X - 0.08) ** 2 + Y * Y) / 0.02)) * lung
    pe, pe_w = _drawn(findings, "Pleural Effusion")
    if pe:
        level = dome - pe_w * (0.1 + 0.14 * pe.severity) - 0.8 * np.maximum(X - 0.1, 0) ** 2
        D += 0.45 * _sig((Y - level) / 0.012) * lung
    ed, ed_w = _drawn(findings, "Edema")
    if ed:
        D += ed_w * (0.1 + 0.06 * ed.severity) * np.exp(-((X / 0.35) ** 2 + (Y / 0.35) ** 2)) * lung
    sd, _ = _drawn(findings, "Support Devices")
    if sd:
        if any(d in sd.devices for d in ("ett", "enteric", "cvc")):
            D += 0.9 * _polyline(X, Y, [(-0.03, -1.1), (0.08, -0.3)], _line_width(0.012, out_size))
        if "pacer" in sd.devices:
            D += 1.4 * _sig((0.05 - np.abs(X + 0.82)) / 0.008) * _sig((0.09 - np.abs(Y + 0.55)) / 0.008)
    return _expose(D, rng, False, out_size, marker=False)


def render_image(findings: Mapping, view: str, size: int, rng: np.random.Generator,
                 anatomy: Mapping | None = None) -> np.ndarray:
    """Findings (CheXpert label -> Finding) + ViewPosition -> uint8 [size, size] grey film.
    PA/AP (and empty) views give a frontal phantom, LATERAL/LL a lateral one."""
    if size < 16:
        raise UsageError(f"image size must be at least 16 pixels, got {size}")
    anat = dict(anatomy) if anatomy is not None else sample_anatomy(rng)
    lateral = view in ("LATERAL", "LL", "RL")
    img = render_lateral(findings, size, rng, anat) if lateral else render_frontal(findings, view, size, rng, anat)
    return np.round(img * 255).astype(np.uint8)
