"""The embedded synthetic benchmark: ultrasound-like images with a *planted* task-affinity truth.

``taskgroup synth --out DIR`` writes a dataset in the real FM_UIA on-disk layout (``train/`` and
``val/`` roots, each with ``csv_files/``, images and index masks; awkward real-style paths
included), with the same 27 task ids, types and class/keypoint counts as the registry, so the
same loader reads real and synthetic data.

The known truth
---------------
Every image is a scene drawn from a few latent factors, one per *structure*:

- ``blob``: a dark ellipse with a bright rim and posterior enhancement (a cyst or lesion); its
  size, elongation, orientation and position around the image centre are factors.
- ``texture``: a rotated rectangle of oriented stripes around a dark unstriped core (an
  organ's parenchyma); its position, stripe period and size are factors (the stripes' direction is free).
- ``lines``: bright line segments with acoustic shadows (bone, pleura); the main line's direction
  (marked by a bright knob at its head), its position and length and the number of lines are
  factors.

Each task's label depends on one structure only (table :data:`TASK_FACTORS`), so the tasks form
three *planted groups*, of 9 tasks each, that need the same structure and must help each other;
tasks of different groups need unrelated structures and compete for capacity. Every scene holds
all three structures, so a task must also learn to ignore the other two. The planted groups cut
across the clinical groups (each clinical group is spread over several planted groups) and mix
task types in the same proportions (4 seg, 3 cls, 1 det, 1 reg each), so that neither organ nor
head type can stand in for the group. Low-data tasks (fetal_heart, organ_cls, cervix_multi,
FUGC) sit with data-rich partners.

The *clinical group* decides only the nuisance "scanner": curvilinear, linear or phased-array
field of view, image size, speckle grain, gain and depth attenuation (and vendor overlay marks),
which carry no label information. Sample counts follow the registry's estimates scaled down (the
rarest task about 1/40 of the most common, as in the real data).

Mechanisms of transfer (generator 5)
------------------------------------
Generators 3 and 4 plant a truth about how images are drawn; what training tasks together does
was left to chance (measured: every partner helped, across-group partners almost as much as
within-group ones). Generator 5 plants *causes* of transfer, each with the sign it should give,
listed in ``truth.yaml`` under ``mechanisms`` (table :data:`DECOYS` and :func:`mechanisms`):

- ``shared_factor`` (+, inside a planted group): members read the same structure, so a partner's
  gradients train the features a task needs; the data-poor members (fewer than
  :data:`DATA_POOR_SHARE` of the most common task's images) overfit alone and gain most.
- ``domain`` (0, across planted groups): an image shows only the structures its tasks read
  (and their decoys'), no longer all three: a partner of another group trains the encoder on
  images without the task's structure, so it brings none of the task's features (with all three
  in every image, every partner taught every structure: generators 3 and 4).
- ``decoy`` (-, across planted groups): in a 2-class task's *training* images only, the
  direction of the main line (which end carries the knob) follows the label (rate
  :data:`DECOY_RATE`); in ``val/`` and ``test/`` it is drawn freely (the line is there in every
  split). The pretrained encoder does not tell the line's two ends apart; a partner that reads
  the knob (the lines group) should make the shortcut salient in the shared features, and the
  task lose on held-out images (shortcut learning, Geirhos et al. 2020, induced by a partner).
  The OB tasks carry no decoy (the data-rich clinical group should gain from every partner).

Generator 5 also writes a held-out ``test/`` split drawn as ``val/``.

The truth is written next to the data as ``truth.yaml`` (factors per task, planted groups,
mechanisms, splits).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from taskgroup.errors import DataError
from taskgroup.tasks import TaskKind, TaskRegistry, TaskSpec

# ----------------------------------------------------------------------------------------------
# The truth: which structure and which label rule each task uses


@dataclasses.dataclass(frozen=True)
class TaskFactor:
    """What a synthetic task's label is: the structure it needs and the rule on it."""

    structure: str  # blob | texture | lines (= the planted group)
    rule: str  # the target, in words


TASK_FACTORS: dict[str, TaskFactor] = {
    # planted group "blob"
    "breast_lesion": TaskFactor("blob", "mask of the blob (rim and core)"),
    "fetal_heart": TaskFactor("blob", "mask of the blob's dark core"),
    "cardiac_multi": TaskFactor("blob", "1 rim, 2 core, 3 posterior enhancement below the blob"),
    "fetal_abdomen_multi": TaskFactor(
        "blob",
        "the blob cut into image-axis quadrants about its centre: 1 top-left, 2 top-right, 3 bottom-left, 4 bottom-right",
    ),
    "lung_2cls": TaskFactor("blob", "blob size: 0 small, 1 large"),
    "fetal_sacral_pos_cls": TaskFactor(
        "blob",
        "octant of the blob centre around the image centre (45 degree sectors, angle from +x towards +y, y pointing down)",
    ),
    "organ_cls": TaskFactor(
        "blob", "sextant of the blob centre around the image centre (60 degree sectors, as the octant)"
    ),
    "thyroid_nodule_det": TaskFactor("blob", "bounding box of the blob"),
    "fetal_femur": TaskFactor("blob", "the two ends of the blob's major axis (point 1 = smaller x)"),
    # planted group "texture"
    "thyroid_nodule": TaskFactor("texture", "mask of the striped patch"),
    "cervix": TaskFactor("texture", "mask of the striped patch"),
    "ovary_tumor": TaskFactor("texture", "mask of the patch's dark core"),
    "cervix_multi": TaskFactor("texture", "1 patch outside its core, 2 core"),
    "fetal_plane_cls": TaskFactor(
        "texture", "sextant of the patch centre around the image centre (60 degree sectors, as the octant)"
    ),
    "breast_2cls": TaskFactor("texture", "side of the patch centre: 0 left of the image centre, 1 right"),
    "liver_lesion_2cls": TaskFactor("texture", "patch size: 0 small, 1 large"),
    "uterine_fibroid_det": TaskFactor("texture", "bounding box of the patch"),
    "FUGC": TaskFactor("texture", "the two ends of the patch's long axis (point 1 = smaller x)"),
    # planted group "lines"
    "lung": TaskFactor("lines", "mask of every line (knob included)"),
    "carotid_artery": TaskFactor("lines", "mask of the main line (with its knob)"),
    "fetal_head": TaskFactor("lines", "mask of the acoustic shadows below the lines"),
    "head_symphysis_multi": TaskFactor("lines", "1 main line with knob, 2 secondary lines"),
    "fetal_head_pos_cls": TaskFactor("lines", "direction tail->knob of the main line in 45 degree bins"),
    "lung_disease_3cls": TaskFactor(
        "lines", "horizontal third of the main line's midpoint: 0 left, 1 middle, 2 right"
    ),
    "breast_3cls": TaskFactor(
        "lines", "depth third of the main line's midpoint: 0 shallow, 1 middle, 2 deep"
    ),
    "spinal_cord_injury_loc": TaskFactor("lines", "bounding box of the main line with its knob"),
    "IUGC": TaskFactor("lines", "main line: 1 tail, 2 midpoint, 3 knob centre"),
}

STRUCTURES = ("blob", "texture", "lines")

#: the scene factor that is each classification task's label
CLASS_FACTORS = {
    "lung_2cls": "blob.size",
    "fetal_sacral_pos_cls": "blob.octant",
    "organ_cls": "blob.sextant",
    "fetal_plane_cls": "texture.sextant",
    "breast_2cls": "texture.side",
    "liver_lesion_2cls": "texture.size",
    "fetal_head_pos_cls": "lines.direction",
    "lung_disease_3cls": "lines.across",
    "breast_3cls": "lines.depth",
}

#: position classes by angular sector around the image centre: a layout of the other two
#: structures that leaves room in every sector is rare in the fans (measured: about 1,500 draws
#: of a scene for an octant, against 1-35 for the other factors), so these are placed last
#: without the every-class check (see :func:`sample_scene`)
SECTOR_FACTORS = frozenset({"blob.octant", "blob.sextant", "texture.sextant"})

#: batches of candidate positions for the structure placed last before a scene is drawn again
LABEL_TRIES = 16

#: classes of every class factor of a scene (what :func:`_draw` draws from)
FACTOR_CLASSES = {
    "blob.size": 2,
    "blob.octant": 8,
    "blob.sextant": 6,
    "texture.size": 2,
    "texture.period": 2,
    "texture.sextant": 6,
    "texture.side": 2,
    "lines.length": 3,
    "lines.direction": 8,
    "lines.depth": 3,
    "lines.across": 3,
    "lines.count": 3,
}


def planted_groups() -> dict[str, tuple[str, ...]]:
    """The planted groups: structure name -> task ids."""
    return {s: tuple(t for t, f in TASK_FACTORS.items() if f.structure == s) for s in STRUCTURES}


# Images shared between tasks, as in the real data: (task, task whose images it reuses, share)
SHARED_IMAGES: tuple[tuple[str, str, float], ...] = (
    ("breast_2cls", "breast_lesion", 0.5),
    ("breast_3cls", "breast_lesion", 0.5),
    ("lung_2cls", "lung", 0.5),
    ("cervix_multi", "FUGC", 1.0),
)

# Dataset folder names; some carry the awkward characters of real paths
# (space, comma, parentheses, "+", U+00A0) so every loader test sees them.
FOLDER_NAMES = {
    "breast_lesion": "BUS (synth)+lesion",
    "fetal_heart": "Fetal\u00a0Heart, synth",
    "FUGC": "FUGC (synth)",
    "lung": "Lung US, synth",
}

#: bumped whenever a rule or a count changes, so that a cached benchmark built by another
#: generator is never reused (it is part of its cache name). The default stays 4 while
#: generator 5's mechanisms are measured (README "The embedded synthetic benchmark")
GENERATOR_VERSION = 4
GENERATOR_VERSIONS = (3, 4, 5)
#: the pretext set's own version: it draws free scenes, which generator 4 left as they were
PRETEXT_VERSION = 3

#: the "image centre" of the position classes (octant, sextant): the middle of the fan's depth
CENTRE_Y = 0.58

#: where the main line's midpoint lies, as shares of the image height / width: the spans that
#: breast_3cls (depth) and lung_disease_3cls (horizontal position) cut into thirds
LINE_DEPTH = (0.22, 0.82)
LINE_ACROSS = (0.12, 0.88)


def splits_of(version: int) -> tuple[str, ...]:
    """The splits a generator writes: generator 5 adds a held-out ``test/`` drawn as ``val/``."""
    return ("train", "val", "test") if version >= 5 else ("train", "val")


@dataclasses.dataclass(frozen=True)
class Decoy:
    """A shortcut planted in a classification task's training images (generator 5): the class
    factor ``factor`` of another structure takes ``classes[label]`` (with probability
    :data:`DECOY_RATE`, else it is drawn freely); held-out splits draw it freely."""

    factor: str
    classes: tuple[int, ...]  # decoy class per label class
    why: str


#: the share of a task's training images whose decoy factor follows the label
DECOY_RATE = 1.0
#: a task whose estimated training size is under this share of the most common task's is
#: data-poor (at the ``small`` scale: fewer than 60 training images)
DATA_POOR_SHARE = 0.05

DECOYS: dict[str, Decoy] = {
    # The decoy is the direction of the main line (tail -> knob) in two opposite 45-degree bins,
    # one per class: the same line either way, only the end with the knob differs. The pretext
    # encoder does not tell the two ends apart (its targets mark the knob as line); the lines
    # tasks that read the knob (IUGC's knob point, fetal_head_pos_cls's direction, the main-line
    # masks and box) teach it. A position of another structure was tried first and gave no
    # measurable effect: positions are in the pretrained features already (README).
    "breast_2cls": Decoy("lines.direction", (0, 4), "IUGC and fetal_head_pos_cls read the knob"),
    "lung_2cls": Decoy("lines.direction", (0, 4), "IUGC and fetal_head_pos_cls read the knob"),
    "liver_lesion_2cls": Decoy("lines.direction", (0, 4), "IUGC and fetal_head_pos_cls read the knob"),
    # OB (fetal_head_pos_cls, fetal_plane_cls, fetal_sacral_pos_cls): no decoy
}


def mechanisms(registry: TaskRegistry) -> list[dict]:
    """The planted causes of transfer of generator 5, as written to ``truth.yaml``: which tasks,
    which mechanism, which partners and the expected sign of the task's gain with them."""
    groups = planted_groups()
    largest = max(t.train_images for t in registry)
    out: list[dict] = []
    for name, members in groups.items():
        members = tuple(t for t in members if t in registry)
        out.append(
            {
                "mechanism": "shared_factor",
                "tasks": list(members),
                "partners": list(members),
                "sign": "+",
                "data_poor": [t for t in members if registry[t].train_images < DATA_POOR_SHARE * largest],
                "cause": f"every member's label is read off the {name} structure",
            }
        )
    for name, members in groups.items():
        members = tuple(t for t in members if t in registry)
        out.append(
            {
                "mechanism": "domain",
                "tasks": list(members),
                "partners": [t for t in registry.ids if t not in members],
                "sign": "0",
                "cause": f"an image shows only the structures its tasks read (and their decoys'): partners "
                f"outside the {name} group train on images without the {name} structure",
            }
        )
    for task, decoy in DECOYS.items():
        if task not in registry:
            continue
        structure = structure_of(decoy.factor)
        out.append(
            {
                "mechanism": "decoy",
                "tasks": [task],
                "partners": [t for t in groups[structure] if t in registry],
                "sign": "-",
                "factor": decoy.factor,
                "classes": list(decoy.classes),
                "rate": DECOY_RATE,
                "cause": f"in the training images {decoy.factor} follows the label ({decoy.why}); "
                "held-out splits draw it freely",
            }
        )
    return out


SCALES = {"tiny": 60, "small": 1200, "medium": 3000}  # train images of the most common task
TINY_FLOOR = 8  # only the "tiny" test scale lifts its rarest tasks to this floor


def synthetic_counts(registry: TaskRegistry, scale: str) -> dict[str, int]:
    """Train images per task: the registry's estimates scaled so the largest task has
    ``SCALES[scale]`` images (the rarest stays about 1/40 of it)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    largest = max(t.train_images for t in registry)
    counts = {t.id: max(1, round(t.train_images * SCALES[scale] / largest)) for t in registry}
    if scale == "tiny":
        counts = {t: max(n, TINY_FLOOR) for t, n in counts.items()}
    return counts


def validation_count(n_train: int, scale: str) -> int:
    """Validation images of a task: 20 % of train, at least a floor that keeps metrics stable
    (100: an accuracy's standard error is then at most 0.05; with 30 images one run could not
    tell a real gain of 0.1 from noise)."""
    floor = 8 if scale == "tiny" else 100
    return max(floor, round(0.2 * n_train))


def _with_decoy(
    fixed: dict[str, int], task: str, label: int, seed: int, split: str, version: int
) -> dict[str, int]:
    """A training image's set class factors with the task's decoy added (generator 5, train
    split only, with probability :data:`DECOY_RATE` decided by the image's own seed)."""
    decoy = DECOYS.get(task)
    if version < 5 or split != "train" or decoy is None:
        return fixed
    if np.random.default_rng([seed, 5]).random() >= DECOY_RATE:
        return fixed
    return {**fixed, decoy.factor: decoy.classes[label]}


# ----------------------------------------------------------------------------------------------
# Scanners (nuisance, per clinical group)


@dataclasses.dataclass(frozen=True)
class Scanner:
    probe: str  # curvilinear | linear | phased
    size: tuple[int, int]  # (H, W)
    half_angle: float  # degrees, sector probes
    grain: float  # speckle correlation length in pixels
    attenuation: float  # depth attenuation over the image height
    gain: float
    overlay: bool  # vendor marks in a corner
    image_format: str  # png | jpg | jpeg | bmp


SCANNERS = {
    "OB": Scanner("curvilinear", (112, 128), 38.0, 0.9, 0.6, 1.0, True, "png"),
    "breast": Scanner("linear", (96, 120), 0.0, 0.7, 0.4, 1.1, False, "png"),
    "lung": Scanner("curvilinear", (112, 112), 32.0, 1.1, 0.8, 0.9, True, "jpg"),
    "thyroid": Scanner("linear", (100, 112), 0.0, 0.6, 0.3, 1.05, False, "bmp"),
    "other": Scanner("phased", (120, 120), 36.0, 1.0, 0.7, 0.95, True, "jpeg"),
}


@functools.cache
def visible_region(scanner: Scanner) -> np.ndarray:
    """(H, W) bool field of view of the probe (cached per scanner: do not modify)."""
    height, width = scanner.size
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    if scanner.probe == "linear":
        region = np.ones((height, width), dtype=bool)
        region[:, : int(0.04 * width)] = False
        region[:, width - int(0.04 * width) :] = False
        return region
    apex_y = -0.35 * height if scanner.probe == "curvilinear" else -0.12 * height
    dy = yy - apex_y
    angle = np.degrees(np.arctan2(xx - width / 2, dy))
    radius = np.hypot(xx - width / 2, dy)
    near = 0.42 * height if scanner.probe == "curvilinear" else 0.16 * height
    far = radius.max() * 0.985
    return (np.abs(angle) <= scanner.half_angle) & (radius >= near) & (radius <= far)


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclasses.dataclass(frozen=True)
class Blob:
    cx: float
    cy: float
    a: float  # semi-major axis, px (outer edge of the rim)
    b: float
    theta: float  # radians, major-axis angle in image coordinates (y down)
    rim: float
    large: int
    octant: int
    sextant: int


@dataclasses.dataclass(frozen=True)
class Patch:
    cx: float
    cy: float
    half_length: float
    half_width: float
    phi: float  # long-axis angle
    psi: float  # stripe-normal angle of the outer stripes
    period: float
    large: int
    fine: int
    sextant: int
    side: int


@dataclasses.dataclass(frozen=True)
class Lines:
    tail: tuple[float, float]
    head: tuple[float, float]
    others: tuple[tuple[tuple[float, float], tuple[float, float]], ...]
    thickness: float
    knob: float
    shadow_depth: float
    direction_bin: int
    length_bin: int
    depth_third: int  # of the main line's midpoint, see LINE_DEPTH
    across_third: int  # of the main line's midpoint, see LINE_ACROSS


@dataclasses.dataclass(frozen=True)
class Scene:
    scanner: Scanner
    blob: Blob
    patch: Patch
    lines: Lines
    seed: int


def _bbox_blob(b: Blob, pad: float = 0.0) -> np.ndarray:
    hx = math.sqrt((b.a * math.cos(b.theta)) ** 2 + (b.b * math.sin(b.theta)) ** 2)
    hy = math.sqrt((b.a * math.sin(b.theta)) ** 2 + (b.b * math.cos(b.theta)) ** 2)
    return np.array([b.cx - hx - pad, b.cy - hy - pad, b.cx + hx + pad, b.cy + hy + pad])


def _patch_corners(p: Patch) -> np.ndarray:
    u = np.array([math.cos(p.phi), math.sin(p.phi)])
    v = np.array([-math.sin(p.phi), math.cos(p.phi)])
    c = np.array([p.cx, p.cy])
    return np.array([c + su * p.half_length * u + sv * p.half_width * v for su in (-1, 1) for sv in (-1, 1)])


def _bbox_patch(p: Patch, pad: float = 0.0) -> np.ndarray:
    corners = _patch_corners(p)
    return np.concatenate([corners.min(axis=0) - pad, corners.max(axis=0) + pad])


def _bbox_main_line(lines: Lines) -> np.ndarray:
    pts = np.array([lines.tail, lines.head])
    r_tail = lines.thickness / 2
    lo = np.minimum(pts[0] - r_tail, pts[1] - lines.knob)
    hi = np.maximum(pts[0] + r_tail, pts[1] + lines.knob)
    return np.concatenate([lo, hi])


def _in_view(boxes: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(N,) which candidate boxes (N, 4) xyxy lie inside the image and the field of view."""
    height, width = region.shape
    x0, y0, x1, y1 = boxes.T
    ok = (x0 >= 1) & (y0 >= 1) & (x1 <= width - 1) & (y1 <= height - 1)
    xm = (x0 + x1) / 2
    # the four corners and the two mid-points of the long sides, all boxes at once: (6, N)
    xi = np.clip(np.stack((x0, x1, x0, x1, xm, xm)), 0, width - 1).astype(int)
    yi = np.clip(np.stack((y0, y0, y1, y1, y0, y1)), 0, height - 1).astype(int)
    return ok & region[yi, xi].all(axis=0)


def _clear_of(boxes: np.ndarray, avoid: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) which candidate boxes overlap none of the boxes in ``avoid``."""
    x0, y0, x1, y1 = boxes.T
    ok = np.ones(len(boxes), dtype=bool)
    for b in avoid:
        ok &= (x1 <= b[0]) | (b[2] <= x0) | (y1 <= b[1]) | (b[3] <= y0)
    return ok


def _first(ok: np.ndarray) -> int | None:
    hits = np.flatnonzero(ok)
    return int(hits[0]) if hits.size else None


def structure_of(factor: str) -> str:
    """The structure a class factor belongs to (``"texture.side"`` -> ``"texture"``)."""
    return factor.split(".", 1)[0]


def sample_scene(
    rng: np.random.Generator,
    scanner: Scanner,
    region: np.ndarray,
    seed: int = 0,
    fixed: Mapping[str, int] | None = None,
    last: str | None = None,
    tries: int = 1,
    free: Sequence[str] = (),
) -> Scene:
    """Draw the latent factors of one image; every class of every rule is equally likely.

    ``free`` names structures the image does not show (generator 5's domain images): they are
    placed after the others, each on its own, clear of nothing, so that they cost one placement
    and constrain no shown structure.

    ``fixed`` sets some class factors (keys of :data:`CLASS_FACTORS`' values) instead of drawing
    them: the generator cycles the classes of a classification task so that every split of
    every size holds every class.

    Structures are placed by rejection (in batches of candidates, vectorised) so that they lie
    in the field of view and do not overlap: a label never depends on an occluded structure.
    They are placed blob, texture, lines, one batch of candidates each, unless ``last`` names
    the structure to place after the other two, with up to ``tries`` batches of candidate
    positions before the whole scene is drawn again. Non-overlap makes the positions of the
    structures depend on each other: a structure placed first, or one whose failure throws the
    others away, tells where the others are. Placing the structure that carries a task's label
    last, with enough tries that it nearly always fits, keeps the other two structures' layout
    independent of the label (generator 4; ``tests/test_synthetic.py`` measures the leak).
    """
    height, width = scanner.size
    s = float(min(height, width))
    n = 64  # candidates per batch
    order = ["blob", "texture", "lines"]
    if last is not None:
        if last not in order:
            raise ValueError(f"unknown structure {last!r}: expected one of {order}")
        order = [o for o in order if o != last] + [last]
    budget = {o: (tries if o == last else 1) for o in order}
    fixed = fixed or {}

    def blob_at(
        occupied: list[np.ndarray], tries: int, fixed: Mapping[str, int]
    ) -> tuple[Blob, list[np.ndarray]] | None:
        # blob: size class, orientation bin, octant of its centre around the image centre
        large = _draw(rng, fixed, "blob.size")
        a = s * (rng.uniform(0.16, 0.19) if large else rng.uniform(0.08, 0.1))
        b = a / rng.uniform(1.55, 1.9)
        theta = rng.uniform(0, math.pi)
        octant = _draw(rng, fixed, "blob.octant")
        sextant = _draw(rng, fixed, "blob.sextant")
        # the centre's angle comes from whichever of the two position classes is set (octant by
        # default); both labels are then read off the angle
        if "blob.sextant" in fixed:
            deg = np.array([sextant * 60 + 30 + rng.uniform(-18, 18)])
        else:
            deg = np.array([octant * 45 + 22.5 + rng.uniform(-12, 12)])
        r = np.array([s * rng.uniform(0.15, 0.21)])
        hx = math.sqrt((a * math.cos(theta)) ** 2 + (b * math.sin(theta)) ** 2)
        hy = math.sqrt((a * math.sin(theta)) ** 2 + (b * math.cos(theta)) ** 2)
        pad = 0.02 * s
        for attempt in range(tries):
            if attempt:  # another batch of positions; a position class not set is drawn again
                if "blob.sextant" in fixed:
                    deg = sextant * 60 + 30 + rng.uniform(-18, 18, n)
                elif "blob.octant" in fixed:
                    deg = octant * 45 + 22.5 + rng.uniform(-12, 12, n)
                else:
                    deg = rng.integers(8, size=n) * 45 + 22.5 + rng.uniform(-12, 12, n)
                r = s * rng.uniform(0.15, 0.21, n)
            ang = np.radians(deg)
            cx, cy = width / 2 + r * np.cos(ang), CENTRE_Y * height + r * np.sin(ang)
            boxes = np.stack([cx - hx, cy - hy, cx + hx, cy + hy], axis=1)
            # the padded box keeps the posterior enhancement below the blob clear
            kept = boxes + np.array([-pad, -pad, pad, pad + 0.11 * s])
            k = _first(_in_view(boxes, region) & _clear_of(kept, occupied))
            if k is None:
                continue
            blob = Blob(
                float(cx[k]),
                float(cy[k]),
                a,
                b,
                theta,
                max(1.6, 0.028 * s),
                large,
                int(deg[k] // 45) % 8,
                int(deg[k] // 60) % 6,
            )
            return blob, [kept[k]]
        return None

    def patch_at(
        occupied: list[np.ndarray], tries: int, fixed: Mapping[str, int]
    ) -> tuple[Patch, list[np.ndarray]] | None:
        # texture patch: size class, stripe period class; free stripe orientation; free position
        # unless its sextant or side (around / about the image centre) is set
        large_p = _draw(rng, fixed, "texture.size")
        hl = s * (rng.uniform(0.18, 0.21) if large_p else rng.uniform(0.12, 0.145))
        hw = s * rng.uniform(0.12, 0.135)
        fine = _draw(rng, fixed, "texture.period")
        period = s * (0.085 if fine else 0.15) * rng.uniform(0.95, 1.05)
        p_sextant = _draw(rng, fixed, "texture.sextant")
        p_side = _draw(rng, fixed, "texture.side")
        psi = rng.uniform(0, math.pi)
        for _ in range(tries):
            if "texture.sextant" in fixed:
                p_ang = np.radians(p_sextant * 60 + rng.uniform(4, 56, n))
                p_r = s * rng.uniform(0.12, 0.45, n)
                cx, cy = width / 2 + p_r * np.cos(p_ang), CENTRE_Y * height + p_r * np.sin(p_ang)
            else:
                cx = rng.uniform(0.1, 0.9, n) * width
                cy = rng.uniform(0.2, 0.9, n) * height
                if "texture.side" in fixed:
                    cx = (0.5 + (1 if p_side else -1) * rng.uniform(0.06, 0.4, n)) * width
            phi = rng.uniform(0, math.pi, n)
            ex = np.abs(hl * np.cos(phi)) + np.abs(hw * np.sin(phi))
            ey = np.abs(hl * np.sin(phi)) + np.abs(hw * np.cos(phi))
            boxes = np.stack([cx - ex, cy - ey, cx + ex, cy + ey], axis=1)
            pad = 0.02 * s
            k = _first(
                _in_view(boxes, region) & _clear_of(boxes + np.array([-pad, -pad, pad, pad]), occupied)
            )
            if k is None:
                continue
            p_deg = math.degrees(math.atan2(cy[k] - CENTRE_Y * height, cx[k] - width / 2)) % 360
            patch = Patch(
                float(cx[k]),
                float(cy[k]),
                hl,
                hw,
                float(phi[k]),
                psi,
                period,
                large_p,
                fine,
                int(p_deg // 60) % 6,
                int(cx[k] > width / 2),
            )
            return patch, [_bbox_patch(patch, 0.03 * s)]
        return None

    def lines_at(
        occupied: list[np.ndarray], tries: int, fixed: Mapping[str, int]
    ) -> tuple[Lines, list[np.ndarray]] | None:
        # lines: main line direction bin and length bin, 0-2 secondary lines; the main line's
        # midpoint is free unless its depth or horizontal third is set
        length_bin = _draw(rng, fixed, "lines.length")
        length = s * (0.16, 0.3, 0.45)[length_bin] * rng.uniform(0.95, 1.05)
        d_bin = _draw(rng, fixed, "lines.direction")
        alpha = math.radians(d_bin * 45 + 22.5 + rng.uniform(-10, 10))
        thickness, knob, shadow = max(1.6, 0.03 * s), max(3.0, 0.06 * s), 0.16 * s
        depth = _draw(rng, fixed, "lines.depth")
        across = _draw(rng, fixed, "lines.across")
        direction = np.array([math.cos(alpha), math.sin(alpha)])
        for _ in range(tries):
            mid = np.stack([rng.uniform(*LINE_ACROSS, n), rng.uniform(*LINE_DEPTH, n)], axis=1)
            for axis, name, band, (lo_, hi_) in (
                (1, "lines.depth", depth, LINE_DEPTH),
                (0, "lines.across", across, LINE_ACROSS),
            ):
                if name in fixed:
                    third = (hi_ - lo_) / 3
                    mid[:, axis] = rng.uniform(lo_ + band * third, lo_ + (band + 1) * third, n)
            mid *= np.array([width, height])
            tails = mid - 0.5 * length * direction
            heads = mid + 0.5 * length * direction
            lo = np.minimum(tails, heads) - knob
            hi = np.maximum(tails, heads) + knob
            visible = _in_view(np.concatenate([lo, hi], axis=1), region)
            with_shadow = np.concatenate([lo, hi + np.array([0, shadow])], axis=1)
            k = _first(visible & _clear_of(with_shadow, occupied))
            if k is not None:
                break
        else:
            return None
        tail, head = tails[k], heads[k]
        depth, across = (_third(mid[k, 1] / height, LINE_DEPTH), _third(mid[k, 0] / width, LINE_ACROSS))
        kept = [with_shadow[k]]
        others: list[tuple[tuple[float, float], tuple[float, float]]] = []
        for _ in range(_draw(rng, fixed, "lines.count")):
            starts = np.stack(
                [rng.uniform(0.05, 0.95, n) * width, rng.uniform(0.15, 0.8, n) * height], axis=1
            )
            beta = rng.uniform(0, 2 * math.pi, n)
            ends = starts + s * rng.uniform(0.14, 0.18, n)[:, None] * np.stack(
                [np.cos(beta), np.sin(beta)], axis=1
            )
            lo = np.minimum(starts, ends) - thickness
            hi = np.maximum(starts, ends) + thickness
            boxes = np.concatenate([lo, hi + np.array([0, shadow])], axis=1)
            ok = _in_view(np.concatenate([lo, hi], axis=1), region) & _clear_of(boxes, occupied)
            # clear of the main line and of the other secondary lines (they are counted apart)
            for seg_a, seg_b, gap in [
                (tail, head, 2.5 * knob),
                *[(np.array(o[0]), np.array(o[1]), 2 * thickness) for o in others],
            ]:
                ok &= _segment_distance(starts, ends, seg_a, seg_b) >= gap
            j = _first(ok)
            if j is None:
                return None
            others.append((tuple(starts[j]), tuple(ends[j])))
            kept.append(boxes[j])
        lines = Lines(
            tuple(tail), tuple(head), tuple(others), thickness, knob, shadow, d_bin, length_bin, depth, across
        )
        return lines, kept

    placers = {"blob": blob_at, "texture": patch_at, "lines": lines_at}
    # the set factors of the structure placed last (but sectors): the layout of the other two
    # is kept only if the last one fits whatever their classes
    checked = {
        f: v
        for f, v in fixed.items()
        if last is not None and structure_of(f) == last and f not in SECTOR_FACTORS
    }

    def place_last(occupied: list[np.ndarray]) -> tuple[Blob | Patch | Lines, list[np.ndarray]] | None:
        found = None
        for combo in itertools.product(*(range(FACTOR_CLASSES[f]) for f in checked)):
            trial = {**fixed, **dict(zip(checked, combo, strict=True))}
            fits = placers[str(last)](occupied, budget[str(last)], trial)
            if fits is None:
                return None
            if trial == fixed:
                found = fits
        return found

    for _attempt in range(2000):  # a set sextant in the narrow phased fan can take a few hundred
        occupied: list[np.ndarray] = []
        placed: dict[str, Blob | Patch | Lines] = {}
        for name in order:
            if name in free:
                continue
            found = (
                place_last(occupied)
                if name == last and checked
                else placers[name](occupied, budget[name], fixed)
            )
            if found is None:
                break
            placed[name], boxes = found
            occupied.extend(boxes)
        else:
            for name in (o for o in order if o in free):
                for _ in range(200):
                    hidden = placers[name]([], 1, fixed)
                    if hidden is not None:
                        placed[name] = hidden[0]
                        break
            if len(placed) == len(order):
                return Scene(scanner, placed["blob"], placed["texture"], placed["lines"], seed)  # type: ignore[arg-type]
    raise RuntimeError(
        f"could not place the structures of scene {seed} in a {width}x{height} {scanner.probe} view"
    )


def _third(value: float, span: tuple[float, float]) -> int:
    """Which third of ``span`` a relative coordinate falls in (clipped to 0..2)."""
    return min(2, max(0, int(3 * (value - span[0]) / (span[1] - span[0]))))


def _draw(rng: np.random.Generator, fixed: Mapping[str, int] | None, name: str) -> int:
    """A class factor (:data:`FACTOR_CLASSES`): drawn uniformly (always consuming the
    generator), unless fixed."""
    value = int(rng.integers(FACTOR_CLASSES[name]))
    return int(fixed[name]) if fixed and name in fixed else value


def _segment_distance(starts: np.ndarray, ends: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) distance between segments starts[i]-ends[i] and a-b, from points sampled along each
    to the other segment (exact for crossing or parallel segments up to the sampling step)."""
    t = np.linspace(0, 1, 9)
    pts = starts[:, None, :] * (1 - t)[None, :, None] + ends[:, None, :] * t[None, :, None]  # (N, 9, 2)
    to_ab = _points_to_segment(pts, a, b).min(axis=1)
    q = a[None, :] * (1 - t)[:, None] + b[None, :] * t[:, None]  # (9, 2)
    ab = (ends - starts)[:, None, :]  # (N, 1, 2)
    rel = q[None, :, :] - starts[:, None, :]  # (N, 9, 2)
    u = np.clip((rel * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)  # (N, 9)
    from_ab = np.linalg.norm(rel - u[..., None] * ab, axis=-1).min(axis=1)
    return np.minimum(to_ab, from_ab)


def _points_to_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


# ----------------------------------------------------------------------------------------------
# Rasterising structures (pixel centres at integer + 0.5, so boxes and points are continuous)


def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    return xx + 0.5, yy + 0.5


def _ellipse(xx, yy, cx, cy, a, b, theta) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _segment_mask(xx, yy, a, b, radius) -> np.ndarray:
    a = np.asarray(a)
    b = np.asarray(b)
    ab = b - a
    t = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.hypot(xx - (a[0] + t * ab[0]), yy - (a[1] + t * ab[1])) <= radius


def _below(mask: np.ndarray, depth: float) -> np.ndarray:
    """Pixels within ``depth`` rows below the lowest pixel of ``mask`` in their column."""
    height = mask.shape[0]
    rows = np.arange(height)[:, None]
    any_col = mask.any(axis=0)
    last = np.where(any_col, height - 1 - np.argmax(mask[::-1], axis=0), -1)
    return any_col[None, :] & (rows > last[None, :]) & (rows <= last[None, :] + depth)


def _under(mask: np.ndarray, depth: float) -> np.ndarray:
    """Pixels up to ``depth`` rows below any pixel of ``mask`` (an acoustic shadow)."""
    out = np.zeros_like(mask)
    steps = round(depth)
    shifted = mask.copy()
    for _ in range(steps):
        shifted = np.vstack([np.zeros((1, mask.shape[1]), dtype=bool), shifted[:-1]])
        out |= shifted
    return out & ~mask


@dataclasses.dataclass(frozen=True)
class SceneMasks:
    """The structures of a scene as (H, W) bool masks."""

    blob_rim: np.ndarray
    blob_core: np.ndarray
    blob_enhancement: np.ndarray
    patch_outer: np.ndarray
    patch_core: np.ndarray
    patch_border: np.ndarray
    main_line: np.ndarray
    other_lines: np.ndarray
    shadow: np.ndarray


def structure_geometry(scene: Scene) -> dict[str, list[float]]:
    """Where each structure of a scene lies and how big it is, in shares of the image width and
    height: (x, y, size) of the blob, the texture patch and the main line's midpoint."""
    height, width = scene.scanner.size
    b, p, ln = scene.blob, scene.patch, scene.lines
    mid = (np.array(ln.tail) + np.array(ln.head)) / 2
    return {
        "blob": [b.cx / width, b.cy / height, b.a / width],
        "texture": [p.cx / width, p.cy / height, p.half_length / width],
        "lines": [mid[0] / width, mid[1] / height, math.dist(ln.tail, ln.head) / width],
    }


def label_leak(spec: TaskSpec, scenes: int, version: int = GENERATOR_VERSION) -> dict[str, float]:
    """How well a classification task's label can be read off the *other* structures: on
    ``scenes`` scenes with the label cycled (as the generator cycles it) and the given
    generator's layout, the 4-fold cross-validated accuracy of gradient-boosted trees
    (scikit-learn) predicting the label from each other structure's :func:`structure_geometry`.
    Chance is 1 / classes; above it, non-overlap tells the label through where the others lie."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import cross_val_score

    factor = CLASS_FACTORS[spec.id]
    layout = {"last": structure_of(factor), "tries": LABEL_TRIES} if version >= 4 else {}
    scanner = SCANNERS[spec.clinical_group]
    region = visible_region(scanner)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(scenes):
        c = i % spec.num_classes
        rows.append(structure_geometry(sample_scene(rng, scanner, region, i, {factor: c}, **layout)))
        labels.append(c)
    return {
        s: float(
            cross_val_score(
                HistGradientBoostingClassifier(max_iter=60), np.array([r[s] for r in rows]), labels, cv=4
            ).mean()
        )
        for s in STRUCTURES
        if s != TASK_FACTORS[spec.id].structure
    }


CORE = 0.4  # the texture patch's core, as a share of its half-sizes (outer stripes dominate)


def rasterise(scene: Scene, shown: Sequence[str] = STRUCTURES) -> SceneMasks:
    """The masks of a scene's structures; those not in ``shown`` (generator 5's domain images)
    are empty: the image does not hold them."""
    xx, yy = _grid(scene.scanner.size)
    none = np.zeros(scene.scanner.size, dtype=bool)
    outer = core = enhancement = patch = p_core = border = main = others = shadow = none
    if "blob" in shown:
        b = scene.blob
        outer = _ellipse(xx, yy, b.cx, b.cy, b.a, b.b, b.theta)
        core = _ellipse(xx, yy, b.cx, b.cy, b.a - b.rim, b.b - b.rim, b.theta)
        enhancement = _below(outer, 0.1 * min(scene.scanner.size))
    if "texture" in shown:
        p = scene.patch
        dx, dy = xx - p.cx, yy - p.cy
        u = dx * math.cos(p.phi) + dy * math.sin(p.phi)
        v = -dx * math.sin(p.phi) + dy * math.cos(p.phi)
        patch = (np.abs(u) <= p.half_length) & (np.abs(v) <= p.half_width)
        p_core = (np.abs(u) <= CORE * p.half_length) & (np.abs(v) <= CORE * p.half_width)
        border = patch & ~((np.abs(u) <= p.half_length - 1.0) & (np.abs(v) <= p.half_width - 1.0))
    if "lines" in shown:
        ln = scene.lines
        main = _segment_mask(xx, yy, ln.tail, ln.head, ln.thickness / 2)
        main |= np.hypot(xx - ln.head[0], yy - ln.head[1]) <= ln.knob
        others = np.zeros_like(main)
        for start, end in ln.others:
            others |= _segment_mask(xx, yy, start, end, ln.thickness / 2)
        shadow = _under(main | others, ln.shadow_depth)
    region = visible_region(scene.scanner)
    return SceneMasks(
        blob_rim=outer & ~core & region,
        blob_core=core & region,
        blob_enhancement=enhancement & region,
        patch_outer=patch & ~p_core & region,
        patch_core=p_core & region,
        patch_border=border & region,
        main_line=main & region,
        other_lines=others & ~main & region,
        shadow=shadow & ~others & region,
    )


def render(scene: Scene, masks: SceneMasks, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 ultrasound-like image of a scene: tissue, structures, speckle, sector."""
    return render_with_echo(scene, masks, rng)[0]


def render_with_echo(
    scene: Scene, masks: SceneMasks, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The image and the noise-free echogenicity map it was made from ((H, W) float in [0, 1],
    before speckle, attenuation and gain): the target of the denoising pretext task. A structure
    whose masks are empty (not shown, :func:`rasterise`) is not drawn; the random draws are the
    same whichever are drawn."""
    sc = scene.scanner
    height, width = sc.size
    xx, yy = _grid(sc.size)
    coarse = rng.standard_normal((height // 8 + 2, width // 8 + 2))
    field = ndimage.zoom(coarse, 8, order=1)[:height, :width]
    tissue = 0.42 + 0.08 * field
    tissue = np.clip(tissue, 0.2, 0.65)
    # texture patch: stripes along psi around a dark, unstriped core (a striped core, as in
    # generator v1, made orientations 90 degrees apart look alike at 64 px)
    p = scene.patch
    phase = rng.uniform(0, 2 * math.pi)
    stripes_out = np.sin(2 * math.pi * (xx * math.cos(p.psi) + yy * math.sin(p.psi)) / p.period + phase)
    tissue = np.where(masks.patch_outer, 0.5 + 0.36 * stripes_out, tissue)
    tissue = np.where(masks.patch_core, 0.16, tissue)
    tissue = np.where(masks.patch_border, 0.85, tissue)
    # blob: bright posterior enhancement, bright rim, dark core
    tissue = np.where(masks.blob_enhancement, np.minimum(tissue * 1.6, 0.95), tissue)
    tissue = np.where(masks.blob_rim, 0.95, tissue)
    tissue = np.where(masks.blob_core, 0.07, tissue)
    # lines: bright reflectors casting shadows
    tissue = np.where(masks.shadow, tissue * 0.22, tissue)
    tissue = np.where(masks.main_line | masks.other_lines, 1.0, tissue)
    region = visible_region(sc)
    echo = np.where(region, np.clip(tissue, 0, 1), 0.0)
    # speckle: Rayleigh amplitude of correlated complex Gaussian noise
    re = ndimage.gaussian_filter(rng.standard_normal(sc.size), sc.grain)
    im = ndimage.gaussian_filter(rng.standard_normal(sc.size), sc.grain)
    speckle = np.hypot(re, im)
    speckle /= speckle.mean()
    attenuation = np.exp(-sc.attenuation * yy / height)
    gain = sc.gain * rng.uniform(0.9, 1.1)
    image = np.clip(tissue * (0.35 + 0.65 * speckle) * attenuation * gain, 0, 1) ** 0.85
    image = np.where(region, image, 0.0)
    if sc.overlay:  # vendor marks outside the field of view
        for k in range(3):
            x0 = int(0.03 * width) + 5 * k
            image[int(0.04 * height) : int(0.04 * height) + 2, x0 : x0 + 3] = 0.9
    return (image * 255).round().astype(np.uint8), echo


# ----------------------------------------------------------------------------------------------
# Labels of each task from a scene


def _box(mask_box: np.ndarray, size: tuple[int, int]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = mask_box
    return (max(0.0, x0), max(0.0, y0), min(float(size[1]), x1), min(float(size[0]), y1))


def _ordered(p1: np.ndarray, p2: np.ndarray) -> list[tuple[float, float]]:
    a, b = sorted([tuple(p1), tuple(p2)])
    return [a, b]


def task_target(spec: TaskSpec, scene: Scene, masks: SceneMasks):
    """The label of task ``spec`` for a scene: mask (H, W) uint8, class int, box or points."""
    t = spec.id
    b, p, ln = scene.blob, scene.patch, scene.lines
    if spec.kind is TaskKind.SEGMENTATION:
        m = np.zeros(scene.scanner.size, dtype=np.uint8)
        blob = masks.blob_rim | masks.blob_core
        patch = masks.patch_outer | masks.patch_core
        if t == "breast_lesion":
            m[blob] = 1
        elif t == "fetal_heart":
            m[masks.blob_core] = 1
        elif t == "cardiac_multi":
            m[masks.blob_rim] = 1
            m[masks.blob_core] = 2
            m[masks.blob_enhancement] = 3
        elif t == "fetal_abdomen_multi":
            xx, yy = _grid(scene.scanner.size)
            right = xx >= b.cx
            lower = yy >= b.cy
            m[blob] = (1 + right.astype(np.uint8) + 2 * lower.astype(np.uint8))[blob]
        elif t in ("thyroid_nodule", "cervix"):
            m[patch] = 1
        elif t == "ovary_tumor":
            m[masks.patch_core] = 1
        elif t == "cervix_multi":
            m[masks.patch_outer] = 1
            m[masks.patch_core] = 2
        elif t == "lung":
            m[masks.main_line | masks.other_lines] = 1
        elif t == "carotid_artery":
            m[masks.main_line] = 1
        elif t == "fetal_head":
            m[masks.shadow] = 1
        elif t == "head_symphysis_multi":
            m[masks.main_line] = 1
            m[masks.other_lines] = 2
        else:
            raise KeyError(f"no synthetic rule for segmentation task {t!r}")
        return m
    if spec.kind is TaskKind.CLASSIFICATION:
        labels = {
            "lung_2cls": b.large,
            "fetal_sacral_pos_cls": b.octant,
            "organ_cls": b.sextant,
            "fetal_plane_cls": p.sextant,
            "breast_2cls": p.side,
            "liver_lesion_2cls": p.large,
            "fetal_head_pos_cls": ln.direction_bin,
            "lung_disease_3cls": ln.across_third,
            "breast_3cls": ln.depth_third,
        }
        if t not in labels:
            raise KeyError(f"no synthetic rule for classification task {t!r}")
        return int(labels[t])
    if spec.kind is TaskKind.DETECTION:
        boxes = {
            "thyroid_nodule_det": _bbox_blob(b),
            "uterine_fibroid_det": _bbox_patch(p),
            "spinal_cord_injury_loc": _bbox_main_line(ln),
        }
        if t not in boxes:
            raise KeyError(f"no synthetic rule for detection task {t!r}")
        return _box(boxes[t], scene.scanner.size)
    if t == "fetal_femur":
        d = np.array([math.cos(b.theta), math.sin(b.theta)]) * b.a
        c = np.array([b.cx, b.cy])
        return _ordered(c - d, c + d)
    if t == "FUGC":
        d = np.array([math.cos(p.phi), math.sin(p.phi)]) * p.half_length
        c = np.array([p.cx, p.cy])
        return _ordered(c - d, c + d)
    if t == "IUGC":
        tail, head = np.array(ln.tail), np.array(ln.head)
        return [tuple(tail), tuple((tail + head) / 2), tuple(head)]
    raise KeyError(f"no synthetic rule for regression task {t!r}")


# ----------------------------------------------------------------------------------------------
# Writing the dataset in the FM_UIA layout

_COUNT_WORDS = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six", 8: "Eight"}


def _folder_name(task_id: str) -> str:
    return FOLDER_NAMES.get(task_id, f"synth_{task_id}")


def _folder(spec: TaskSpec) -> Path:
    name = _folder_name(spec.id)
    if spec.kind is TaskKind.SEGMENTATION:
        return Path("Segmentation") / _COUNT_WORDS[spec.num_classes] / name
    if spec.kind is TaskKind.CLASSIFICATION:
        return Path("Classification") / _COUNT_WORDS[spec.num_classes] / name
    if spec.kind is TaskKind.DETECTION:
        return Path("Detection") / "One" / name
    return Path("Regression") / name


@dataclasses.dataclass(frozen=True)
class _ImageJob:
    split: str
    owner: str  # the task whose folder holds the image
    number: int
    clinical_group: str
    seed: int
    fixed: dict[str, int] | None = None  # class factors set to cycle the task's classes
    last: str | None = None  # the structure placed last (generator 4: the label's)
    tries: int = 1
    shown: tuple[str, ...] = STRUCTURES  # the structures drawn (generator 5: DOMAIN)


def _scene_for(job: _ImageJob) -> tuple[Scene, SceneMasks, np.random.Generator]:
    scanner = SCANNERS[job.clinical_group]
    rng = np.random.default_rng(job.seed)
    free = tuple(s for s in STRUCTURES if s not in job.shown)
    scene = sample_scene(
        rng, scanner, visible_region(scanner), job.seed, job.fixed, job.last, job.tries, free
    )
    return scene, rasterise(scene, job.shown), rng


def _map_chunks(
    write: Callable[[tuple], list[dict]],
    shared: tuple,
    jobs: Sequence,
    workers: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """``write((*shared, chunk))`` over chunks of ``jobs`` (in worker processes when workers > 1),
    the rows of all chunks in job order."""
    workers = workers or min(4, os.cpu_count() or 1)
    size = max(1, math.ceil(len(jobs) / (workers * 8)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    rows: list[dict] = []
    done = 0
    try:
        results = (
            pool.map(write, [(*shared, c) for c in chunks]) if pool else (write((*shared, c)) for c in chunks)
        )
        for chunk, result in zip(chunks, results, strict=True):
            rows.extend(result)
            done += len(chunk)
            if progress:
                progress(done, len(jobs))
    finally:
        if pool is not None:
            pool.shutdown()
    return rows


def _write_chunk(args: tuple[Path, TaskRegistry, dict[str, list[str]], list[_ImageJob]]) -> list[dict]:
    """Render and write one chunk of images; returns CSV rows (one per task using the image)."""
    out, registry, users, jobs = args
    rows = []
    for job in jobs:
        scene, masks, rng = _scene_for(job)
        owner = registry[job.owner]
        folder = _folder(owner)
        fmt = scene.scanner.image_format
        rel_image = folder / "images" / f"{job.owner}_{job.number:05d}.{fmt}"
        path = out / job.split / rel_image
        path.parent.mkdir(parents=True, exist_ok=True)
        gray = render(scene, masks, rng)
        rgb = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
        if fmt in ("jpg", "jpeg"):
            rgb.save(path, quality=95)
        elif fmt == "png":
            rgb.save(path, compress_level=1)
        else:
            rgb.save(path)
        for task_id in users[f"{job.split}/{job.owner}/{job.number}"]:
            spec = registry[task_id]
            row: dict = {
                "_split": job.split,
                "image_path": f"../{rel_image.as_posix()}",
                "task_id": task_id,
                "task_name": spec.kind.value,
                "num_classes": spec.num_classes,
            }
            target = task_target(spec, scene, masks)
            if spec.kind is TaskKind.SEGMENTATION:
                rel_mask = _folder(spec) / "masks" / f"{job.owner}_{job.number:05d}.png"
                mask_file = out / job.split / rel_mask
                mask_file.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(target, mode="L").save(mask_file, compress_level=1)
                row["mask_path"] = f"../{rel_mask.as_posix()}"
            elif spec.kind is TaskKind.CLASSIFICATION:
                row["mask"] = target
            elif spec.kind is TaskKind.DETECTION:
                row.update(
                    zip(("x_min", "y_min", "x_max", "y_max"), (round(v, 2) for v in target), strict=True)
                )
            else:
                for k, (x, y) in enumerate(target, start=1):
                    row[f"point_{k}_xy"] = f"[{x:.2f}, {y:.2f}]"
            rows.append(row)
    return rows


def _csv_name(spec: TaskSpec, part: int, folder: str, n: int) -> str:
    prefix = {"segmentation": "Seg", "classification": "Cls", "detection": "Det", "Regression": "Reg"}[
        spec.kind.value
    ]
    words = "" if spec.kind is TaskKind.REGRESSION else f"-{_COUNT_WORDS[spec.num_classes]}"
    return f"{prefix}{words}_{part}.{folder}_{n}.csv"


@dataclasses.dataclass(frozen=True)
class SynthSummary:
    out: Path
    counts: dict[str, dict[str, int]]  # split -> task -> rows
    images: int


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """Every image a benchmark draws, before any is rendered: the jobs (split, owner, seed, set
    class factors), which tasks use each image, and the rows per split and task."""

    jobs: tuple[_ImageJob, ...]
    users: dict[str, list[str]]  # "split/owner/number" -> the tasks labelled on that image
    counts: dict[str, dict[str, int]]  # split -> task -> rows


def _shown(tasks: Sequence[str]) -> tuple[str, ...]:
    """The structures an image of generator 5 shows: those its tasks read, and the structure of
    their decoys (in every split: a decoy differs between splits in how it is drawn, not in
    whether it is there)."""
    needed = {TASK_FACTORS[t].structure for t in tasks}
    needed |= {structure_of(DECOYS[t].factor) for t in tasks if t in DECOYS}
    return tuple(s for s in STRUCTURES if s in needed)


def plan_images(registry: TaskRegistry, scale: str, seed: int, version: int) -> ImagePlan:
    """The images of a benchmark (:class:`ImagePlan`); :func:`generate` renders and writes them."""
    if version not in GENERATOR_VERSIONS:
        raise ValueError(f"synthetic generator version {version}: expected one of {GENERATOR_VERSIONS}")
    missing = [t.id for t in registry if t.id not in TASK_FACTORS]
    if missing:
        raise ValueError(
            f"task {missing[0]!r} has no synthetic rule (the benchmark covers the 27 FM_UIA tasks)"
        )
    counts_train = synthetic_counts(registry, scale)
    held_out = {t: validation_count(n, scale) for t, n in counts_train.items()}
    split_counts = {split: counts_train if split == "train" else held_out for split in splits_of(version)}
    shared = {
        task: (source, share)
        for task, source, share in SHARED_IMAGES
        if task in registry and source in registry
    }
    jobs: list[_ImageJob] = []
    users: dict[str, list[str]] = {}
    task_index = {t.id: i for i, t in enumerate(registry)}
    for split_no, (split, counts) in enumerate(split_counts.items()):
        # the source images each sharing task takes: the first ones (version 3), or ranges one
        # after the other (version 4: each image then carries at most one set class factor)
        ranges: dict[str, range] = {}
        for task_id, (source, share) in shared.items():
            start = max((r.stop for t, r in ranges.items() if shared[t][0] == source), default=0)
            start = start if version >= 4 else 0
            ranges[task_id] = range(start, min(start + round(share * counts[task_id]), counts[source]))
        for spec in registry:
            borrowers = [t for t, (source, _) in shared.items() if source == spec.id]
            lent: dict[int, dict[str, int]] = {}  # source image -> the class factor its borrower sets
            for t in borrowers:
                if version >= 4 and t in CLASS_FACTORS:
                    for k, i in enumerate(ranges[t]):
                        label = k % registry[t].num_classes
                        # (a borrower's own images start after its range: no seed is reused)
                        lent_seed = int(
                            np.random.SeedSequence([seed, split_no, task_index[t], k]).generate_state(1)[0]
                        )
                        lent[i] = _with_decoy({CLASS_FACTORS[t]: label}, t, label, lent_seed, split, version)
            for i in range(len(ranges[spec.id]) if spec.id in ranges else 0, counts[spec.id]):
                users[f"{split}/{spec.id}/{i}"] = [spec.id]
                seed_i = int(
                    np.random.SeedSequence([seed, split_no, task_index[spec.id], i]).generate_state(1)[0]
                )
                label = i % spec.num_classes
                fixed = (
                    _with_decoy({CLASS_FACTORS[spec.id]: label}, spec.id, label, seed_i, split, version)
                    if spec.id in CLASS_FACTORS
                    else lent.get(i)
                )
                last = structure_of(next(iter(fixed))) if fixed and version >= 4 else None
                tries = LABEL_TRIES if last else 1
                jobs.append(_ImageJob(split, spec.id, i, spec.clinical_group, seed_i, fixed, last, tries))
        for task_id, (source, _) in shared.items():
            for i in ranges[task_id]:  # the source task's images serve this task too
                users[f"{split}/{source}/{i}"].append(task_id)
    if version >= 5:
        jobs = [
            dataclasses.replace(job, shown=_shown(users[f"{job.split}/{job.owner}/{job.number}"]))
            for job in jobs
        ]
    return ImagePlan(tuple(jobs), users, split_counts)


#: the file in an output folder while :func:`generate` writes it (its generator, scale and seed),
#: so a folder left half-written is known as the generator's; a finished benchmark is known by
#: its ``truth.yaml``, and the marker is removed (the files written are exactly the benchmark's)
SYNTH_MARKER = ".taskgroup-synth"


def generate(
    out: str | Path,
    registry: TaskRegistry,
    scale: str = "small",
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    version: int = GENERATOR_VERSION,
    overwrite: bool = False,
) -> SynthSummary:
    """Write the synthetic benchmark to ``out`` (``train/``, ``val/``, generator 5 also
    ``test/``, and ``truth.yaml``).

    A ``train/``, ``val/`` or ``test/`` already in ``out`` is replaced only when this generator
    wrote the folder (its ``truth.yaml``, or :data:`SYNTH_MARKER` of an interrupted run: a cache
    folder of ``~/.cache/taskgroup`` made by any earlier version has its ``truth.yaml``) or with
    ``overwrite``; otherwise (real data, say) it is a :class:`DataError` and nothing is deleted.

    ``version`` 4 (default) places the structure that carries a classification task's label
    last (:func:`sample_scene`), in the task's own images and in the images it shares with
    another task (each classification task then shares its own range of them); version 3, the
    generator before 2026-11-24, keeps the benchmark its figures were measured on (there,
    breast_2cls's label, the side of the texture patch, is read off the lines' position with
    80 % accuracy); version 5 adds the planted mechanisms of transfer (:data:`DECOYS`,
    :func:`mechanisms`) and a held-out test split (versions 3 and 4 are byte-identical to what
    they were, a test)."""
    out = Path(out)
    held = [name for name in ("train", "val", "test", "truth.yaml") if (out / name).exists()]

    def written_here() -> bool:
        if (out / SYNTH_MARKER).is_file():
            return True
        try:
            truth = read_truth(out)
        except (OSError, ValueError, yaml.YAMLError):
            return False
        return isinstance(truth, dict) and {"generator_version", "planted_groups", "tasks"} <= set(truth)

    if held and not overwrite and not written_here():
        raise DataError(
            f"{out}: holds {', '.join(held)}, not written by taskgroup synth (no truth.yaml of the "
            "synthetic benchmark): nothing deleted; choose another --out, or pass --overwrite to "
            "replace them"
        )
    plan = plan_images(registry, scale, seed, version)
    split_counts = plan.counts
    out.mkdir(parents=True, exist_ok=True)
    marker = out / SYNTH_MARKER
    marker.write_text(yaml.safe_dump({"generator_version": version, "scale": scale, "seed": seed}))
    for split in ("train", "val", "test"):  # a split of another generator is not left behind
        shutil.rmtree(out / split, ignore_errors=True)
    rows = _map_chunks(_write_chunk, (out, registry, plan.users), list(plan.jobs), workers, progress)
    _write_csvs(out, registry, rows, tuple(split_counts))
    _write_truth(out, registry, scale, seed, split_counts, version)
    marker.unlink()
    return SynthSummary(out, split_counts, len(plan.jobs))


def _write_csvs(out: Path, registry: TaskRegistry, rows: list[dict], splits: Sequence[str]) -> None:
    import pandas as pd

    by_split_task: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_split_task.setdefault((r.pop("_split"), r["task_id"]), []).append(r)
    for split in splits:
        folder = out / split / "csv_files"
        folder.mkdir(parents=True, exist_ok=True)
        for spec in registry:
            sub = sorted(by_split_task.get((split, spec.id), []), key=lambda r: r["image_path"])
            name = _folder_name(spec.id)
            cols = ["image_path", "task_id", "task_name", "num_classes"]
            cols += {
                "segmentation": ["mask_path"],
                "classification": ["mask"],
                "detection": ["x_min", "y_min", "x_max", "y_max"],
            }.get(spec.kind.value, [f"point_{k}_xy" for k in range(1, spec.num_classes + 1)])
            # one task spans two CSV files, as breast_3cls does in the real release
            parts = [sub[: len(sub) // 2], sub[len(sub) // 2 :]] if spec.id == "breast_3cls" else [sub]
            for k, part in enumerate(parts, start=1):
                pd.DataFrame(part, columns=cols).to_csv(
                    folder / _csv_name(spec, k, name, len(part)), index=False
                )


def _write_truth(
    out: Path, registry: TaskRegistry, scale: str, seed: int, counts: dict, version: int
) -> None:
    truth = {
        "description": "Synthetic FM_UIA-like benchmark with a planted task-affinity structure; "
        "see taskgroup.data.synthetic. Each task's label depends on one structure; tasks sharing a "
        "structure form a planted group.",
        "generator_version": version,
        "scale": scale,
        "seed": seed,
        "structures": {
            "blob": "dark ellipse with bright rim and posterior enhancement: size, position (orientation free)",
            "texture": "rotated rectangle of stripes around a small dark core: position, stripe period, size",
            "lines": "bright segments with acoustic shadows, main one with a knob: direction, position, length, count",
        },
        **({"splits": list(counts)} if version >= 5 else {}),
        "planted_groups": {g: list(ids) for g, ids in planted_groups().items()},
        "tasks": {
            t.id: {
                "structure": TASK_FACTORS[t.id].structure,
                "rule": TASK_FACTORS[t.id].rule,
                "clinical_group": t.clinical_group,
                "type": t.kind.value,
                **{split: c[t.id] for split, c in counts.items()},
                **({"decoy": DECOYS[t.id].factor} if version >= 5 and t.id in DECOYS else {}),
            }
            for t in registry
        },
        **({"mechanisms": mechanisms(registry)} if version >= 5 else {}),
        "scanners": {g: dataclasses.asdict(s) for g, s in SCANNERS.items()},
    }
    (out / "truth.yaml").write_text(
        yaml.safe_dump(truth, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


def read_truth(path: str | Path) -> dict:
    """The truth written next to a synthetic dataset (``truth.yaml``)."""
    path = Path(path)
    file = path / "truth.yaml" if path.is_dir() else path
    return yaml.safe_load(file.read_text(encoding="utf-8"))


def planted_labels(task_ids: Sequence[str]) -> list[int]:
    """Planted group index per task, for adjusted Rand index against a found grouping."""
    return [STRUCTURES.index(TASK_FACTORS[t].structure) for t in task_ids]


# ----------------------------------------------------------------------------------------------
# A pretext dataset for pretraining an encoder on synthetic images (as real use starts from a
# pretrained DINOv3): generic targets that name no task's label.

#: echogenicity levels of the denoising pretext task
ECHO_LEVELS = 8
ORIENTATION_BINS = 6
PRETEXT_TASKS = ("synthetic_structures", "synthetic_echo", "synthetic_orientation")


def orientation_map(echo: np.ndarray, bins: int = ORIENTATION_BINS) -> np.ndarray:
    """Dominant local gradient orientation of an image, as (H, W) uint8 classes: 0 where the
    image is flat or has no single orientation, else 1 + the orientation's bin of 180/bins
    degrees. From the structure tensor (Gaussian derivatives at sigma 1, window sigma 2), a
    dense cousin of the HOG targets of MaskFeat (Wei et al. 2022). Written here with
    scipy.ndimage filters because no installed library labels orientation bins."""
    gx = ndimage.gaussian_filter(echo, 1.0, order=(0, 1))
    gy = ndimage.gaussian_filter(echo, 1.0, order=(1, 0))
    jxx = ndimage.gaussian_filter(gx * gx, 2.0)
    jyy = ndimage.gaussian_filter(gy * gy, 2.0)
    jxy = ndimage.gaussian_filter(gx * gy, 2.0)
    energy = jxx + jyy
    coherence = np.hypot(jxx - jyy, 2 * jxy) / np.maximum(energy, 1e-12)
    theta = np.mod(0.5 * np.arctan2(2 * jxy, jxx - jyy), np.pi)
    labels = 1 + np.minimum((theta / (np.pi / bins)).astype(np.uint8), bins - 1)
    return np.where((energy > 2e-3) & (coherence > 0.5), labels, 0).astype(np.uint8)


def pretext_registry() -> TaskRegistry:
    """Three dense tasks on the same images: which structure a pixel belongs to (background,
    blob, texture patch, line), the pixel's noise-free echogenicity in 8 levels (denoising), and
    the local orientation of the noise-free image (:func:`orientation_map`). All are generic
    (objectness, seeing through speckle, oriented edges, as pretrained encoders see them);
    none is any benchmark task's label."""
    from taskgroup.tasks import MetricSpec

    metrics = (MetricSpec("dsc", True), MetricSpec("hd", False))
    tasks = (
        TaskSpec("synthetic_structures", TaskKind.SEGMENTATION, 4, "synthetic", "pretext", 0, metrics),
        TaskSpec("synthetic_echo", TaskKind.SEGMENTATION, ECHO_LEVELS, "synthetic", "pretext", 0, metrics),
        TaskSpec(
            "synthetic_orientation",
            TaskKind.SEGMENTATION,
            ORIENTATION_BINS + 1,
            "synthetic",
            "pretext",
            0,
            metrics,
        ),
    )
    return TaskRegistry("synthetic_pretext", tasks, {"pretext": PRETEXT_TASKS})


def _write_pretext_chunk(args: tuple[Path, list[tuple[int, str, int]]]) -> list[dict]:
    out, jobs = args
    rows = []
    for number, group, seed in jobs:
        scanner = SCANNERS[group]
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, scanner, visible_region(scanner), seed)
        masks = rasterise(scene)
        image, echo = render_with_echo(scene, masks, rng)
        structures = np.zeros(scanner.size, dtype=np.uint8)
        structures[masks.patch_outer | masks.patch_core] = 2
        structures[masks.blob_rim | masks.blob_core] = 1
        structures[masks.main_line | masks.other_lines] = 3
        levels = np.minimum((echo * ECHO_LEVELS).astype(np.uint8), ECHO_LEVELS - 1)
        name = f"{number:05d}.png"
        for sub, array in (
            ("images", np.repeat(image[..., None], 3, axis=2)),
            ("structures", structures),
            ("echo", levels),
            ("orientation", orientation_map(echo)),
        ):
            path = out / "Pretext" / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, compress_level=1)
        for task, sub, classes in (
            ("synthetic_structures", "structures", 4),
            ("synthetic_echo", "echo", ECHO_LEVELS),
            ("synthetic_orientation", "orientation", ORIENTATION_BINS + 1),
        ):
            rows.append(
                {
                    "image_path": f"../Pretext/images/{name}",
                    "task_id": task,
                    "task_name": "segmentation",
                    "num_classes": classes,
                    "mask_path": f"../Pretext/{sub}/{name}",
                }
            )
    return rows


def generate_pretext(out: str | Path, images: int, seed: int = 1000, workers: int | None = None) -> Path:
    """Write ``images`` pretext images (every scanner in turn) as an FM_UIA root at ``out``."""
    import pandas as pd

    out = Path(out)
    groups = list(SCANNERS)
    jobs = [
        (i, groups[i % len(groups)], int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        for i in range(images)
    ]
    rows = _map_chunks(_write_pretext_chunk, (out,), jobs, workers)
    (out / "csv_files").mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for task in PRETEXT_TASKS:
        part = frame[frame.task_id == task]
        part.to_csv(out / "csv_files" / f"Seg-Pretext_1.{task}_{len(part)}.csv", index=False)
    return out
