"""Small but valid ICC v2 profiles, written byte by byte for the colour-management tests.

No profiles ship with this machine, and Pillow's ImageCms can only create sRGB, Lab and XYZ
profiles by name, so the tests build the ones phones, cameras and print shops embed:

- `display_p3()`: Apple's Display P3 (P3 primaries, D65 white, the sRGB tone curve);
- `adobe_rgb()`: Adobe RGB (1998) (its primaries, D65 white, gamma 563/256);
- `gray_gamma22()`: a gray profile with gamma 2.2 (what some scanners embed);
- `naive_cmyk()`: a CMYK profile whose AToB0 table maps ink to the Lab colour of the naive
  formula R = 255 (1 - C')(1 - K') with "dot gain" C' = C ** 0.6 (midtones print darker, as
  on paper); not a real press, but a real LUT-based profile, so the code path of a CMYK JPEG
  from a print workflow runs for real, and its midtones differ from Pillow's plain
  profile-less conversion while its solid inks match it. Its darkest black is a dark grey
  (PAPER_BLACK), as on paper, so black point compensation has something to do.

Matrix/TRC profiles store their colorants adapted to the D50 connection space (Bradford),
as the ICC specification requires.
"""

from __future__ import annotations

import struct

import numpy as np

D50 = np.array([0.9642, 1.0, 0.8249])
D65_XY = (0.3127, 0.3290)
SRGB_XY = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))
P3_XY = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
ADOBE_RGB_XY = ((0.640, 0.330), (0.210, 0.710), (0.150, 0.060))
# sRGB's piecewise curve as an ICC parametric curve of type 3:
# Y = (a X + b) ^ g for X >= d, else c X.
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)

# Ink coverage printed per ink requested, as a power: below 1, midtones come out darker.
DOT_GAIN = 0.6
# The darkest the naive press prints, as an sRGB value (0..1): black ink on paper reflects
# some light. Black point compensation maps this to sRGB black.
PAPER_BLACK = 0.12

_BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)


def display_p3() -> bytes:
    return matrix_trc_profile("Display P3 (test)", P3_XY, D65_XY, SRGB_CURVE)


def adobe_rgb() -> bytes:
    return matrix_trc_profile("Adobe RGB (1998) (test)", ADOBE_RGB_XY, D65_XY, 563 / 256)


def gray_gamma22() -> bytes:
    tags = {
        b"desc": _desc("Gray gamma 2.2 (test)"),
        b"wtpt": _xyz(D50),
        b"kTRC": _curve(2.2),
        b"cprt": _text("No copyright, test data"),
    }
    return _profile(b"mntr", b"GRAY", b"XYZ ", tags)


def naive_cmyk(grid_points: int = 5) -> bytes:
    tags = {
        b"desc": _desc("Naive CMYK (test)"),
        b"wtpt": _xyz(D50),
        b"A2B0": _lut16_cmyk_to_lab(grid_points),
        b"B2A0": _lut16_lab_to_cmyk(17),
        b"cprt": _text("No copyright, test data"),
    }
    return _profile(b"prtr", b"CMYK", b"Lab ", tags)


def rgb_to_xyz_d50(primaries_xy, white_xy) -> np.ndarray:
    """The 3x3 matrix from linear RGB to D50 XYZ: columns are the adapted colorants."""
    primaries = np.array([_xy_to_xyz(x, y) for x, y in primaries_xy]).T
    white = _xy_to_xyz(*white_xy)
    scale = np.linalg.solve(primaries, white)
    to_xyz = primaries * scale
    return _adapt(white, D50) @ to_xyz


def matrix_trc_profile(description: str, primaries_xy, white_xy, curve) -> bytes:
    """A display ("mntr") RGB profile from primaries, a white point and one tone curve."""
    to_xyz = rgb_to_xyz_d50(primaries_xy, white_xy)
    trc = _curve(curve)
    tags = {
        b"desc": _desc(description),
        # ICC v2 display profiles carry the display's own white here (D65), and their
        # colorants adapted to D50; relative colorimetric conversion maps white to white.
        b"wtpt": _xyz(_xy_to_xyz(*white_xy)),
        b"rXYZ": _xyz(to_xyz[:, 0]),
        b"gXYZ": _xyz(to_xyz[:, 1]),
        b"bXYZ": _xyz(to_xyz[:, 2]),
        b"rTRC": trc,
        b"gTRC": trc,
        b"bTRC": trc,
        b"cprt": _text("No copyright, test data"),
    }
    return _profile(b"mntr", b"RGB ", b"XYZ ", tags)


def _xy_to_xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _adapt(source_white: np.ndarray, target_white: np.ndarray) -> np.ndarray:
    source_cone = _BRADFORD @ source_white
    target_cone = _BRADFORD @ target_white
    return np.linalg.inv(_BRADFORD) @ np.diag(target_cone / source_cone) @ _BRADFORD


def _profile(device_class: bytes, color_space: bytes, pcs: bytes, tags: dict) -> bytes:
    table = b""
    data = b""
    offset = 128 + 4 + 12 * len(tags)
    for signature, body in tags.items():
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + b"\0" * (-len(body) % 4)  # tags start on 4-byte boundaries
    body = struct.pack(">I", len(tags)) + table + data
    header = (
        struct.pack(">I", 128 + len(body))
        + b"lcms"  # preferred CMM
        + struct.pack(">I", 0x02100000)  # version 2.1
        + device_class
        + color_space
        + pcs
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 4  # platform
        + b"\0" * 4  # flags
        + b"\0" * 8  # manufacturer, model
        + b"\0" * 8  # attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15f16(D50)  # the connection space's illuminant
        + b"\0" * 4  # creator
        + b"\0" * 16  # profile ID (MD5); zero means "not computed"
        + b"\0" * 28
    )
    assert len(header) == 128
    return header + body


def _s15f16(values) -> bytes:
    return b"".join(struct.pack(">i", round(float(v) * 65536)) for v in values)


def _xyz(values) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15f16(values)


def _curve(curve) -> bytes:
    if isinstance(curve, tuple):  # parametric curve, function type 3
        return b"para" + b"\0" * 4 + struct.pack(">HH", 3, 0) + _s15f16(curve)
    # A single-entry 'curv' is a pure gamma, stored as u8Fixed8.
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(curve * 256))


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (
        b"desc"
        + b"\0" * 4
        + struct.pack(">I", len(ascii_text))
        + ascii_text
        + struct.pack(">II", 0, 0)  # no Unicode description
        + struct.pack(">HB", 0, 0)  # no ScriptCode description
        + b"\0" * 67
    )


def _text(text: str) -> bytes:
    return b"text" + b"\0" * 4 + text.encode("ascii") + b"\0"


def _lut16_cmyk_to_lab(grid_points: int) -> bytes:
    """The AToB0 table: CMYK ink to the Lab colour the naive press prints."""
    steps = np.linspace(0.0, 1.0, grid_points)
    c, m, y, k = np.meshgrid(steps, steps, steps, steps, indexing="ij")  # C varies slowest
    c, m, y, k = (ink**DOT_GAIN for ink in (c, m, y, k))
    rgb = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1)
    rgb = PAPER_BLACK + (1 - PAPER_BLACK) * rgb  # ink on paper is never fully black
    return _lut16(4, _encode_lab(_srgb_to_lab_d50(rgb.reshape(-1, 3))), grid_points)


def _lut16_lab_to_cmyk(grid_points: int) -> bytes:
    """The BToA0 table: the ink (CMY, no black ink) that prints each Lab colour.

    Littlecms needs it to find the press's black point, which black point compensation
    maps to sRGB black.
    """
    steps = np.linspace(0.0, 1.0, grid_points)
    encoded = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    lab = np.empty_like(encoded)  # the grid nodes, in the ICC v2 16-bit Lab encoding
    lab[:, 0] = encoded[:, 0] * 65535 / 652.80
    lab[:, 1:] = encoded[:, 1:] * 65535 / 256 - 128
    rgb = (_lab_d50_to_srgb(lab) - PAPER_BLACK) / (1 - PAPER_BLACK)
    ink = (1 - np.clip(rgb, 0, 1)) ** (1 / DOT_GAIN)
    cmyk = np.concatenate([ink, np.zeros((len(ink), 1))], axis=1)
    return _lut16(3, cmyk * 65535, grid_points)


def _encode_lab(lab: np.ndarray) -> np.ndarray:
    """Lab in the ICC v2 16-bit encoding: L 0..100 -> 0..0xFF00, a/b +-128 -> 0..0xFFFF."""
    return np.concatenate([lab[:, :1] * 65280 / 100, (lab[:, 1:] + 128) * 256], axis=1)


def _lut16(inputs: int, clut: np.ndarray, grid_points: int) -> bytes:
    """An 'mft2' tag: identity matrix and curves around `clut` (first input slowest)."""
    outputs = clut.shape[1]
    identity = np.array([0, 65535], dtype=">u2").tobytes()  # two-entry linear curve
    return (
        b"mft2"
        + b"\0" * 4
        + struct.pack(">BBBB", inputs, outputs, grid_points, 0)
        + _s15f16([1, 0, 0, 0, 1, 0, 0, 0, 1])
        + struct.pack(">HH", 2, 2)
        + identity * inputs
        + np.clip(np.round(clut), 0, 65535).astype(">u2").tobytes()
        + identity * outputs
    )


def _srgb_to_lab_d50(rgb: np.ndarray) -> np.ndarray:
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ rgb_to_xyz_d50(SRGB_XY, D65_XY).T
    ratio = xyz / D50
    f = np.where(ratio > (6 / 29) ** 3, np.cbrt(ratio), ratio / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=-1
    )


def _lab_d50_to_srgb(lab: np.ndarray) -> np.ndarray:
    fy = (lab[:, 0] + 16) / 116
    f = np.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], axis=-1)
    ratio = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    linear = np.clip((ratio * D50) @ np.linalg.inv(rgb_to_xyz_d50(SRGB_XY, D65_XY)).T, 0, 1)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)
