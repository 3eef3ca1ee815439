"""Deterministic image corruptions: the 15 Robust-Seg types plus two real-degradation extensions.

Protocol: ``shared/methods/corruptions.md``. Every type has 5 severities (ImageNet-C convention);
severity 3 is the single Robust-Seg setting, so results stay comparable with RobustSAM/GaRA-SAM
while severity curves can be plotted. What each level does is in ``LEVELS`` below (one row per
type, s1..s5; the s3 column quotes the protocol).

Everything is NumPy/OpenCV. albumentations 2.0.8 implements most of these, but importing it
takes ~4 s here (it imports torch through ``albumentations.pytorch``), which every worker process
of the dataset generator would pay, and Robust-Seg's snow/rain/fog layers came from imgaug, which
does not import on NumPy 2 and is re-implemented here from its source (SnowflakesLayer,
CloudLayer). Formulas that follow albumentations say so where they are used.

Determinism: all randomness comes from one ``numpy.random.Generator`` seeded by a SHA-256 of
(image key, type, severity, seed), never Python's ``hash()``; OpenCV runs single-threaded (see
``single_threaded_cv2``), so bytes do not depend on process, worker count or machine load.

Images are RGB ``uint8`` arrays of shape (H, W, 3). Masks are bool arrays of shape (K, H, W).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from gara.seeding import seeded_rng

# Bump when any corruption's output changes, so the dataset generator's re-run records are
# invalidated instead of silently reusing images made by older code.
GENERATOR_VERSION = "1"

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# What each severity does (s3 = the Robust-Seg setting). U(a, b): drawn uniformly per image.
LEVELS: dict[str, tuple[str, str, str, str, str]] = {
    "snow": (
        "flakes density 0.10, 1 layer",
        "density 0.20, 1-2 layers",
        "density 0.35, flake size U(0.6,0.8), speed U(0.01,0.015), 1-3 layers, bleach 1.0",
        "density 0.45, 2-3 layers, bleach x1.5",
        "density 0.55, 3 layers, bleach x2.0",
    ),
    "fog": (
        "cloud density U(0.10,0.25), particle fog coef U(0.03,0.06), final blur size/60",
        "cloud density U(0.20,0.45), fog coef U(0.06,0.10), final blur size/45",
        "cloud density U(0.4,0.9), alpha min U(0.7,0.9), fog coef U(0.1,0.2), alpha 0.08",
        "cloud density U(0.7,0.95), fog coef U(0.2,0.3)",
        "cloud density U(0.85,1.0), fog coef U(0.3,0.4)",
    ),
    "rain": (
        "density U(0.01,0.03), speed U(0.03,0.05), 1 layer, visibility 1.3",
        "density U(0.02,0.08), speed U(0.04,0.08), 1-2 layers",
        "drop size U(0.40,0.50), speed U(0.05,0.10), density U(0.03,0.14), 1-3 layers",
        "density U(0.10,0.18), speed U(0.08,0.12), 2-3 layers, visibility 1.7",
        "density U(0.15,0.25), speed U(0.10,0.15), 3 layers, visibility 2.2",
    ),
    "gaussian_noise": (
        "variance U(60,65)",
        "variance U(125,130)",
        "variance U(250,260) (std ~16 of 255), per channel",
        "variance U(500,520)",
        "variance U(1000,1040)",
    ),
    "iso_noise": (
        "colour shift U(0.10,0.15), intensity U(0.20,0.30)",
        "colour shift U(0.20,0.30), intensity U(0.40,0.50)",
        "colour shift U(0.4,0.5), intensity U(0.7,0.8)",
        "colour shift U(0.5,0.6), intensity U(0.9,1.0)",
        "colour shift U(0.6,0.7), intensity U(1.1,1.2)",
    ),
    "impulse_noise": (
        "per-pixel multiplier U(1.10,1.20)",
        "multiplier U(1.25,1.35)",
        "multiplicative noise (as Robust-Seg), per-pixel per-channel multiplier U(1.4,1.5)",
        "multiplier U(1.55,1.70)",
        "multiplier U(1.75,1.95)",
    ),
    "resampling_blur": (
        "down x2, up",
        "down x3, up",
        "down x4 (area), up (bilinear)",
        "down x6, up",
        "down x8, up",
    ),
    "motion_blur": (
        "line kernel size 3-9",
        "kernel 9-21",
        "kernel 3-35 (blur limit 35), random angle, centred",
        "kernel 35-49",
        "kernel 49-65",
    ),
    "zoom_blur": (
        "max factor 1.11, step U(0.05,0.07)",
        "max factor 1.21",
        "max factor 1.33, step U(0.05,0.07)",
        "max factor 1.45",
        "max factor 1.60",
    ),
    "color_jitter": (
        "brightness/contrast/saturation 0.25 x s3, hue 0.05",
        "brightness/contrast/saturation 0.5 x s3, hue 0.2",
        "brightness 0.7, contrast 0.3, saturation 0.7, hue 0.7, random order",
        "brightness/contrast/saturation 1.25 x s3, hue 0.7",
        "brightness/contrast/saturation 1.5 x s3, hue 0.7",
    ),
    "jpeg": (
        "quality U(20,25)",
        "quality U(12,16)",
        "quality U(5,10)",
        "quality U(3,5)",
        "quality U(1,2)",
    ),
    "elastic": (
        "alpha 50, sigma 10, affine 2 px",
        "alpha 75, sigma 10, affine 3.5 px",
        "alpha 100, sigma 10, affine 5 px",
        "alpha 200, sigma 10, affine 8 px",
        "alpha 300, sigma 10, affine 12 px",
    ),
    "frosted_glass": (
        "each pixel from a random neighbour within +-1 px",
        "within +-2 px",
        "within +-3 px",
        "within +-4 px",
        "within +-6 px",
    ),
    "brightness": (
        "x U(0.88,0.95)",
        "x U(0.75,0.85)",
        "x U(0.6,0.8) (darkening)",
        "x U(0.45,0.55)",
        "x U(0.30,0.40)",
    ),
    "contrast": (
        "(I-128) x U(1.15,1.20) + 128",
        "x U(1.30,1.40)",
        "(I-128) x U(1.6,1.7) + 128, clipped",
        "x U(2.0,2.2)",
        "x U(2.6,3.0)",
    ),
    "low_light": (
        "exposure x U(0.40,0.50), read noise 1 e-",
        "exposure x U(0.20,0.30), read noise 2 e-",
        "exposure x U(0.10,0.15), read noise 3 e- (extension: not in Robust-Seg)",
        "exposure x U(0.05,0.08), read noise 4 e-",
        "exposure x U(0.02,0.04), read noise 6 e-",
    ),
    "night": (
        "low light s1 x 0.8, colour cast strength 0.2",
        "low light s2 x 0.8, cast 0.35",
        "low light s3 x 0.8, blue (moonlight) or orange (sodium) cast 0.5 (extension)",
        "low light s4 x 0.8, cast 0.65",
        "low light s5 x 0.8, cast 0.8",
    ),
}


# --- determinism helpers -----------------------------------------------------------------


def corruption_rng(key: str, name: str, severity: int, seed: int) -> np.random.Generator:
    return seeded_rng("corruption", key, name, severity, seed)


@contextlib.contextmanager
def single_threaded_cv2() -> Iterator[None]:
    """Run OpenCV on one thread: results and timings then do not depend on the worker count."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


# --- shared building blocks --------------------------------------------------------------


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _to_u8(x: np.ndarray) -> np.ndarray:
    """Round and clip a float image in 0..255 to uint8."""
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _line_kernel(size: int, angle_deg: float, forward_only: bool = False) -> np.ndarray:
    """Normalised line kernel through the centre (as albumentations' create_motion_kernel).

    Centred and symmetric unless ``forward_only``: a symmetric blur smears an object without
    moving it, so masks stay valid (Robust-Seg's albumentations 1.x kernel could be shifted).
    """
    size = max(3, size | 1)
    c = size // 2
    t = np.linspace(0.0 if forward_only else -c, c, size)
    a = np.deg2rad(angle_deg)
    xs = np.clip(np.round(c + np.cos(a) * t), 0, size - 1).astype(int)
    ys = np.clip(np.round(c + np.sin(a) * t), 0, size - 1).astype(int)
    k = np.zeros((size, size), np.float32)
    k[ys, xs] = 1.0
    return k / k.sum()


def _frequency_noise(rng: np.random.Generator, size: int, exponent: float) -> np.ndarray:
    """imgaug's FrequencyNoise: white noise shaped by f**exponent in Fourier space, in [0, 1]."""
    size = max(2, size)
    spectrum = np.fft.fft2(rng.standard_normal((size, size)))
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    noise = np.real(np.fft.ifft2(spectrum * f**exponent)).astype(np.float32)
    noise -= noise.min()
    return noise / max(float(noise.max()), 1e-8)


def _resize(x: np.ndarray, h: int, w: int, interp: int = cv2.INTER_CUBIC) -> np.ndarray:
    return cv2.resize(x, (w, h), interpolation=interp)


def _particle_layer(
    rng: np.random.Generator,
    h: int,
    w: int,
    density: float,
    density_uniformity: float,
    flake_size: float,
    size_uniformity: float,
    angle: float,
    speed: float,
    blur_sigma_fraction: float,
    rain: bool = False,
) -> np.ndarray:
    """One imgaug SnowflakesLayer, or with ``rain`` its RainLayer (no blur, no gamma): float32."""
    down = float(np.clip(1.0 - flake_size, 0.001, 1.0))
    hd, wd = max(1, int(h * down)), max(1, int(w * down))
    # imgaug Salt: hit pixels get 255 * (0.5 + |Beta(0.5, 0.5) - 0.5|)
    salt = rng.random((hd, wd)) < density
    values = 255.0 * (0.5 + np.abs(rng.beta(0.5, 0.5, size=(hd, wd)) - 0.5))
    noise = np.where(salt, values, 0.0).astype(np.float32)
    # gate by coarse Beta noise: patchy density, as imgaug
    gate = rng.beta(1.0, max(1.0 - density_uniformity, 1e-3), size=(8, 8)).astype(np.float32)
    noise *= np.clip(_resize(gate, hd, wd), 0.0, 1.0)
    noise = np.clip(np.floor(noise), 0, 255)
    noise = np.clip(_resize(noise, h, w), 0, 255)
    if not rain:
        sigma = float(np.clip(max(h, w) * blur_sigma_fraction, 0.5, 3.75))
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    k = int(speed * max(h, w))
    if k > 1:
        noise = cv2.filter2D(noise, -1, _line_kernel(k, angle + 90.0, forward_only=True))
    if rain:
        return np.clip(noise, 0, 255)
    gain = 1.0 + 2.0 * (1.0 - size_uniformity)
    gain_adj = 1.0 + 5.0 * (1.0 - size_uniformity)
    noise = np.clip(noise, 0, 255) / 255.0
    return (noise**gain) * (255.0 * gain_adj)


# --- the corruptions ---------------------------------------------------------------------
# Each takes (image uint8 RGB, severity index 0..4, rng) and returns the corrupted image;
# geometric ones also take and return masks (K, H, W) bool or None.


def _snow(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    density = (0.10, 0.20, 0.35, 0.45, 0.55)[s]
    layers = ((1, 1), (1, 2), (1, 3), (2, 3), (3, 3))[s]
    bleach = (1.0, 1.0, 1.0, 1.5, 2.0)[s]
    snow_point = _u(rng, (0.3, 0.7))
    out = img
    if bleach != 1.0:  # albumentations RandomSnow 'bleach'; Robust-Seg's coeff 1.0 is a no-op
        hls = cv2.cvtColor(img, cv2.COLOR_RGB2HLS)
        light = hls[..., 1].astype(np.float32)
        thresh = snow_point * 255 / 2 + 255 / 3
        light = np.where(light < thresh, light * bleach, light)
        hls[..., 1] = np.clip(light, 0, 255).astype(np.uint8)
        out = cv2.cvtColor(hls, cv2.COLOR_HLS2RGB)
    f = out.astype(np.float32)
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(layers[0], layers[1] + 1))):
        sp = _u(rng, (0.01, 0.015))
        noise = _particle_layer(
            rng, h, w, density, _u(rng, (0.3, 0.9)), _u(rng, (0.6, 0.8)), _u(rng, (0.4, 0.8)),
            _u(rng, (-30, 30)), sp, _u(rng, (0.0001, 0.001)),
        )[..., None]
        # imgaug blends: sum for faint glow, max for the flakes themselves
        f = np.clip(f + (0.1 + 20 * sp) * noise, 0, 255)
        f = np.maximum(f, (1.0 + 20 * sp) * noise)
    return _to_u8(f)


def _fog(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    # 1) imgaug Fog = CloudLayer(intensity 220-255, alpha_min 0.7-0.9, alpha_mult 0.3,
    #    alpha noise at 2-8 px with exponent -4..-2, sparsity 0.9, density 0.4-0.9 at s3).
    dens = ((0.10, 0.25), (0.20, 0.45), (0.4, 0.9), (0.7, 0.95), (0.85, 1.0))[s]
    intensity_mean = _u(rng, (220, 255))
    coarse = intensity_mean + rng.normal(0, 2, size=(8, 8)).astype(np.float32)
    fine = _frequency_noise(rng, min(64, max(h, w)), _u(rng, (-2.0, -1.5)))
    intensity = _resize(coarse, h, w) + intensity_mean * (2 * _resize(fine, h, w) - 1) / 5
    alpha_noise = _frequency_noise(rng, int(rng.integers(2, 9)), _u(rng, (-4.0, -2.0)))
    alpha = (_u(rng, (0.7, 0.9)) + 0.3 * np.clip(_resize(alpha_noise, h, w), 0, 1)) ** 0.9
    alpha = np.clip(alpha * _u(rng, dens), 0, 1)[..., None]
    f = (1 - alpha) * f + alpha * np.clip(intensity, 0, 255)[..., None]
    # 2) albumentations RandomFog (fog coef, alpha 0.08): ~thousands of white discs, each blended
    #    with alpha = 0.08 * coef, denser towards the centre. Blending n discs progressively is
    #    255 - (255 - I) * (1 - a)^n, so we draw only the per-pixel disc count n (via
    #    centre histograms convolved with disc kernels): same picture, ~100x faster.
    coef = _u(rng, ((0.03, 0.06), (0.06, 0.10), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4))[s])
    region = max(1, int(w // 3 * coef))
    cur_w, cur_h, cx, cy = w, h, w // 2, h // 2
    xs_all, ys_all = [], []
    for _ in range(10):
        if not (cur_w > region and cur_h > region):
            break
        n = int(cur_w * cur_h / (region * region) * coef * 10)
        xs_all.append(rng.integers(cx - cur_w // 2, cx + cur_w // 2 + 1, size=n))
        ys_all.append(rng.integers(cy - cur_h // 2, cy + cur_h // 2 + 1, size=n))
        cur_w, cur_h = int(cur_w * 0.9), int(cur_h * 0.9)
    if xs_all:
        xs, ys = np.concatenate(xs_all), np.concatenate(ys_all)
        r_max = max(2, int(min(h, w) * 0.1 * coef))
        radii = rng.integers(max(1, r_max // 2), r_max, size=len(xs))
        count = np.zeros((h, w), np.float32)
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        for r in np.unique(radii):
            sel = inside & (radii == r)
            hist = np.zeros((h, w), np.float32)
            np.add.at(hist, (ys[sel], xs[sel]), 1.0)
            disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            count += cv2.filter2D(hist, -1, disc.astype(np.float32), borderType=cv2.BORDER_CONSTANT)
        keep = (1.0 - 0.08 * coef) ** np.round(count)
        f = 255.0 - (255.0 - f) * keep[..., None]
    # RandomFog's final blur (size min(h, w) / 30 at s3); lighter at s1/s2
    blur = max(3, min(h, w) // (60, 45, 30, 30, 30)[s]) | 1
    return _to_u8(cv2.GaussianBlur(f, (blur, blur), 0))


def _rain(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """imgaug 0.4 Rain: 1-3 RainLayers, each streak layer alpha-blended in a grey drop colour."""
    density = ((0.01, 0.03), (0.02, 0.08), (0.03, 0.14), (0.10, 0.18), (0.15, 0.25))[s]
    speed = ((0.03, 0.05), (0.04, 0.08), (0.05, 0.10), (0.08, 0.12), (0.10, 0.15))[s]
    layers = ((1, 1), (1, 2), (1, 3), (2, 3), (3, 3))[s]
    visibility = (1.3, 1.3, 1.3, 1.7, 2.2)[s]  # imgaug's 1.3; raised at s4/s5 so they read heavier
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    for _ in range(int(rng.integers(layers[0], layers[1] + 1))):
        noise = _particle_layer(
            rng, h, w, _u(rng, density), _u(rng, (0.8, 1.0)), _u(rng, (0.40, 0.50)),
            _u(rng, (0.2, 0.5)), _u(rng, (-15, 15)), _u(rng, speed), 0.001, rain=True,
        )
        a = np.clip(visibility * noise / 255.0, 0, 1)[..., None]
        f = (1 - a) * f + a * _u(rng, (110, 240))
    return _to_u8(f)


def _gaussian_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    var = _u(rng, ((60, 65), (125, 130), (250, 260), (500, 520), (1000, 1040))[s])
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(np.sqrt(var))
    return _to_u8(img.astype(np.float32) + noise)


def _iso_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """albumentations' ISONoise formula: Poisson luminance noise + Gaussian hue shift in HLS."""
    shift = _u(rng, ((0.10, 0.15), (0.20, 0.30), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7))[s])
    intensity = _u(rng, ((0.2, 0.3), (0.4, 0.5), (0.7, 0.8), (0.9, 1.0), (1.1, 1.2))[s])
    hls = cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2HLS)
    std = float(hls[..., 1].std())
    h, w = img.shape[:2]
    lum = rng.poisson(std * intensity, size=(h, w)).astype(np.float32)
    hue = rng.normal(0, shift * intensity, size=(h, w)).astype(np.float32)
    hls[..., 0] += hue
    hls[..., 1] += lum * intensity * (1.0 - hls[..., 1])
    rgb = cv2.cvtColor(hls, cv2.COLOR_HLS2RGB)
    return _to_u8(np.clip(rgb, 0, 1) * 255.0)


def _impulse_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Robust-Seg's 'impulse noise' was albumentations MultiplicativeNoise; we keep that."""
    lo, hi = ((1.10, 1.20), (1.25, 1.35), (1.4, 1.5), (1.55, 1.70), (1.75, 1.95))[s]
    mult = rng.uniform(lo, hi, size=img.shape).astype(np.float32)
    return _to_u8(img.astype(np.float32) * mult)


def _resampling_blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    factor = (2, 3, 4, 6, 8)[s]
    h, w = img.shape[:2]
    small = cv2.resize(
        img, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _motion_blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = ((3, 9), (9, 21), (3, 35), (35, 49), (49, 65))[s]
    size = int(rng.choice(np.arange(lo, hi + 1, 2)))
    kernel = _line_kernel(size, _u(rng, (0, 360)))
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _zoom_blur(
    img: np.ndarray, s: int, rng: np.random.Generator, masks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """ImageNet-C zoom blur: mean of the image and centre zooms 1..max_factor.

    Zooming moves pixels outward, so each mask gets the same zooms, averaged, kept where >= 0.5.
    """
    max_factor = (1.11, 1.21, 1.33, 1.45, 1.60)[s]
    zooms = np.arange(1.0, max_factor, _u(rng, (0.05, 0.07)))
    h, w = img.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    acc = img.astype(np.float32)
    macc = None if masks is None else masks.astype(np.float32)
    mstack = None if masks is None else np.ascontiguousarray(masks.transpose(1, 2, 0), np.float32)
    for z in zooms:
        m = np.float32([[z, 0, (1 - z) * cx], [0, z, (1 - z) * cy]])
        acc += cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if macc is not None:
            warped = _warp_stack(mstack, lambda x, m=m: cv2.warpAffine(
                x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
            macc += warped
    n = len(zooms) + 1
    out_masks = None if macc is None else macc >= 0.5 * n
    return _to_u8(acc / n), out_masks


def _color_jitter(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision/albumentations ColorJitter, in random order; hue is a shift of U(-h, h) turns.

    Done here because albumentations caps hue at 0.5 while Robust-Seg's setting is 0.7.
    """
    scale = (0.25, 0.5, 1.0, 1.25, 1.5)[s]
    b, c, sat = 0.7 * scale, 0.3 * scale, 0.7 * scale
    # hue 0.7 already reaches every hue; lower levels must stay far below it to look mild
    hue = (0.05, 0.2, 0.7, 0.7, 0.7)[s]
    f = img.astype(np.float32) / 255.0
    for op in rng.permutation(4):
        if op == 0:
            f = np.clip(f * _u(rng, (max(0.0, 1 - b), 1 + b)), 0, 1)
        elif op == 1:
            gray_mean = float(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).mean())
            f = np.clip((f - gray_mean) * _u(rng, (max(0.0, 1 - c), 1 + c)) + gray_mean, 0, 1)
        elif op == 2:
            gray = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)[..., None]
            f = np.clip(gray + (f - gray) * _u(rng, (max(0.0, 1 - sat), 1 + sat)), 0, 1)
        else:
            hsv = cv2.cvtColor(f, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * _u(rng, (-hue, hue)), 360.0)
            f = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)
    return _to_u8(f * 255.0)


def _jpeg(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = ((20, 25), (12, 16), (5, 10), (3, 5), (1, 2))[s]
    quality = int(rng.integers(lo, hi + 1))
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode the image")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _elastic(
    img: np.ndarray, s: int, rng: np.random.Generator, masks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """albumentations 1.x ElasticTransform(alpha, sigma, alpha_affine) as Robust-Seg used it.

    A random affine (3 control points moved by up to +-affine px) then a smooth displacement
    field alpha * Gaussian(sigma) of U(-1, 1) noise, composed into one remap so image and
    masks see exactly the same mapping (masks: bilinear, kept where >= 0.5).
    """
    alpha = (50.0, 75.0, 100.0, 200.0, 300.0)[s]
    affine = (2.0, 3.5, 5.0, 8.0, 12.0)[s]
    sigma = 10.0
    h, w = img.shape[:2]
    centre = np.float32([h // 2, w // 2])
    sq = min(h, w) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    # albumentations warps with this matrix as the forward map; we need its inverse for remap
    fwd = cv2.getAffineTransform(pts1, pts2)
    inv = cv2.invertAffineTransform(fwd)
    dx = cv2.GaussianBlur(rng.uniform(-1, 1, size=(h, w)).astype(np.float32), (0, 0), sigma)
    dy = cv2.GaussianBlur(rng.uniform(-1, 1, size=(h, w)).astype(np.float32), (0, 0), sigma)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    ex, ey = xs + dx * alpha, ys + dy * alpha  # elastic step, sampling the affine-warped image
    map_x = (inv[0, 0] * ex + inv[0, 1] * ey + inv[0, 2]).astype(np.float32)
    map_y = (inv[1, 0] * ex + inv[1, 1] * ey + inv[1, 2]).astype(np.float32)
    out = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if masks is None:
        return out, None
    stack = np.ascontiguousarray(masks.transpose(1, 2, 0), np.float32)
    warped = _warp_stack(stack, lambda x: cv2.remap(
        x, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    return out, warped >= 0.5


def _frosted_glass(
    img: np.ndarray, s: int, rng: np.random.Generator, masks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each pixel copied from a random neighbour within +-d px; masks get the same copies."""
    d = (1, 2, 3, 4, 6)[s]
    h, w = img.shape[:2]
    ys = np.arange(h, dtype=np.int32)[:, None] + rng.integers(-d, d + 1, size=(h, w), dtype=np.int32)
    xs = np.arange(w, dtype=np.int32)[None, :] + rng.integers(-d, d + 1, size=(h, w), dtype=np.int32)
    ys = np.abs(ys)  # reflect at the borders (BORDER_REFLECT_101)
    ys = np.where(ys > h - 1, 2 * (h - 1) - ys, ys).clip(0, h - 1)
    xs = np.abs(xs)
    xs = np.where(xs > w - 1, 2 * (w - 1) - xs, xs).clip(0, w - 1)
    out = img[ys, xs]
    return out, None if masks is None else masks[:, ys, xs]


def _brightness(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    factor = _u(rng, ((0.88, 0.95), (0.75, 0.85), (0.6, 0.8), (0.45, 0.55), (0.30, 0.40))[s])
    return _to_u8(img.astype(np.float32) * factor)


def _contrast(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    factor = _u(rng, ((1.15, 1.20), (1.30, 1.40), (1.6, 1.7), (2.0, 2.2), (2.6, 3.0))[s])
    lut = _to_u8((np.arange(256, dtype=np.float32) - 128.0) * factor + 128.0)
    return lut[img]


_SRGB_TO_LIN = ((np.arange(256, dtype=np.float32) / 255.0) ** 2.2).astype(np.float32)
_LIN_STEPS = 4096
_LIN_TO_SRGB = _to_u8(255.0 * (np.arange(_LIN_STEPS + 1, dtype=np.float32) / _LIN_STEPS) ** (1 / 2.2))
_FULL_WELL = 1000.0  # photo-electrons at white in the clean exposure


def _sensor_low_light(
    img: np.ndarray, exposure: float, read_noise: float, cast: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Darken in linear light, then Poisson-Gaussian sensor noise (as LIS's synthesis).

    Shot noise is signal-dependent: variance = electrons; read noise is Gaussian. We use the
    heteroscedastic Gaussian form N(x, x/Q + (r/Q)^2) of the Poisson-Gaussian model (Foi et al.),
    which is ~6x faster than numpy's Poisson sampler at this size and indistinguishable at
    these photon counts.
    """
    lin = _SRGB_TO_LIN[img] * (cast * np.float32(exposure))
    q = np.float32(_FULL_WELL)
    std = np.sqrt(lin / q + np.float32((read_noise / _FULL_WELL) ** 2))
    noisy = lin + std * rng.standard_normal(img.shape, dtype=np.float32)
    idx = np.clip(noisy * _LIN_STEPS + 0.5, 0, _LIN_STEPS).astype(np.int32)
    return _LIN_TO_SRGB[idx]


_EXPOSURE = ((0.40, 0.50), (0.20, 0.30), (0.10, 0.15), (0.05, 0.08), (0.02, 0.04))
_READ_NOISE = (1.0, 2.0, 3.0, 4.0, 6.0)


def _low_light(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    exposure = _u(rng, _EXPOSURE[s])
    return _sensor_low_light(img, exposure, _READ_NOISE[s], np.ones(3, np.float32), rng)


# Linear-light RGB gains of the two casts (sodium street light, moonlight), max 1.
_CASTS = (np.float32([1.0, 0.72, 0.42]), np.float32([0.55, 0.72, 1.0]))


def _night(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    strength = (0.2, 0.35, 0.5, 0.65, 0.8)[s]
    tint = _CASTS[int(rng.integers(0, 2))]
    cast = (1.0 + strength * (tint - 1.0)).astype(np.float32)
    exposure = 0.8 * _u(rng, _EXPOSURE[s])
    return _sensor_low_light(img, exposure, _READ_NOISE[s], cast, rng)


def _warp_stack(stack: np.ndarray, warp: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an OpenCV warp to a (H, W, K) float stack in chunks of 4 channels; -> (K, H, W)."""
    k = stack.shape[2]
    parts = []
    for i in range(0, k, 4):
        out = warp(np.ascontiguousarray(stack[..., i : i + 4]))
        parts.append(out.reshape(out.shape[0], out.shape[1], -1))
    if not parts:
        return np.zeros((0, stack.shape[0], stack.shape[1]), np.float32)
    return np.concatenate(parts, axis=2).transpose(2, 0, 1)


# --- registry ----------------------------------------------------------------------------

PhotometricFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
GeometricFn = Callable[
    [np.ndarray, int, np.random.Generator, np.ndarray | None],
    tuple[np.ndarray, np.ndarray | None],
]


@dataclass(frozen=True)
class Corruption:
    name: str
    fn: PhotometricFn | GeometricFn
    geometric: bool = False  # moves pixels: masks are warped with the image
    extension: bool = False  # not one of Robust-Seg's 15 types

    @property
    def levels(self) -> tuple[str, str, str, str, str]:
        return LEVELS[self.name]


_REGISTRY: tuple[Corruption, ...] = (
    Corruption("snow", _snow),
    Corruption("fog", _fog),
    Corruption("rain", _rain),
    Corruption("gaussian_noise", _gaussian_noise),
    Corruption("iso_noise", _iso_noise),
    Corruption("impulse_noise", _impulse_noise),
    Corruption("resampling_blur", _resampling_blur),
    Corruption("motion_blur", _motion_blur),
    Corruption("zoom_blur", _zoom_blur, geometric=True),
    Corruption("color_jitter", _color_jitter),
    Corruption("jpeg", _jpeg),
    Corruption("elastic", _elastic, geometric=True),
    Corruption("frosted_glass", _frosted_glass, geometric=True),
    Corruption("brightness", _brightness),
    Corruption("contrast", _contrast),
    Corruption("low_light", _low_light, extension=True),
    Corruption("night", _night, extension=True),
)
CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in _REGISTRY}
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)
ROBUST_SEG_NAMES: tuple[str, ...] = tuple(c.name for c in _REGISTRY if not c.extension)
GEOMETRIC_NAMES: tuple[str, ...] = tuple(c.name for c in _REGISTRY if c.geometric)


def get_corruption(name: str) -> Corruption:
    try:
        return CORRUPTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown corruption type {name!r}; valid types: {', '.join(CORRUPTION_NAMES)}"
        ) from None


def check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if int(severity) not in SEVERITIES:
        raise ValueError(
            f"severity {severity!r} out of range; valid severities: "
            f"{', '.join(map(str, SEVERITIES))}"
        )
    return int(severity)


def resolve_types(types: Sequence[str] | None) -> list[str]:
    """Validate a type selection (None = all) and return it in registry order, deduplicated."""
    if types is None:
        return list(CORRUPTION_NAMES)
    wanted = {get_corruption(t).name for t in types}
    if not wanted:
        raise ValueError(f"no corruption types given; valid types: {', '.join(CORRUPTION_NAMES)}")
    return [n for n in CORRUPTION_NAMES if n in wanted]


def resolve_severities(severities: Sequence[int] | None) -> list[int]:
    if severities is None:
        return list(SEVERITIES)
    chosen = sorted({check_severity(s) for s in severities})
    if not chosen:
        raise ValueError(f"no severities given; valid severities: {SEVERITIES}")
    return chosen


def apply_corruption(
    image: np.ndarray,
    name: str,
    severity: int,
    seed: int,
    masks: np.ndarray | None = None,
    key: str = "",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Corrupt one RGB uint8 image (H, W, 3); return (image, masks).

    ``key`` names the image (e.g. its file name) so that two images under the same seed get
    different noise; the output is a pure function of (image, key, name, severity, seed).

    Geometric types (zoom_blur, elastic, frosted_glass) move pixels, and the instance masks
    (K, H, W) bool are warped with exactly the same displacement. Robust-Seg did not warp its
    masks (so its elastic GT was misaligned); we do. Photometric types return ``masks`` as given.
    """
    corruption = get_corruption(name)
    sev = check_severity(severity)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"image must be a uint8 array of shape (H, W, 3), got {got}")
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
            raise ValueError(
                f"masks must have shape (K, {image.shape[0]}, {image.shape[1]}), got {masks.shape}"
            )
    rng = corruption_rng(key, name, sev, seed)
    image = np.ascontiguousarray(image)
    with single_threaded_cv2():
        if corruption.geometric:
            out, out_masks = corruption.fn(image, sev - 1, rng, masks)  # type: ignore[call-arg]
            return out, out_masks
        return corruption.fn(image, sev - 1, rng), masks  # type: ignore[call-arg]
