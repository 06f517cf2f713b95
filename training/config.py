"""Typed configuration for data, models and training (Hydra structured-config groups).

Each dataclass is one config group or a part of one; the YAML files in ``pipelines/conf`` extend them. Library
functions take the sub-config they need (``TrainConfig``, ``ModelConfig`` ...), never the root config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# Choice fields are Enums: a typo fails when the configuration is composed, naming the choices (StrEnum members
# compare and serialise as their value, so configs, hashes and run ids read as plain strings).


class DataSource(StrEnum):
    """Where ``pull_data`` gets the dataset (``data.source``)."""

    synth = "synth"
    deeppcb = "deeppcb"
    folder = "folder"
    yolo_seg = "yolo_seg"
    snapshot = "snapshot"


class GroupBy(StrEnum):
    """What a split keeps together (``data.split.group_by``)."""

    none = "none"
    design = "design"


class FitMode(StrEnum):
    """How an image of any size is fitted to the crop size (``data.fit_mode``)."""

    letterbox = "letterbox"
    resize = "resize"
    center_crop = "center_crop"


class Tta(StrEnum):
    """Test-time augmentation views (``model.tta``)."""

    none = "none"
    hflip = "hflip"
    rot4 = "rot4"
    d8 = "d8"


class Sampler(StrEnum):
    """Class balancing of the training draw (``train.sampler``)."""

    none = "none"
    inverse_frequency = "inverse_frequency"
    effective_number = "effective_number"


class Select(StrEnum):
    """Which epoch's checkpoint the run keeps (``train.select``)."""

    val_macro_recall = "val_macro_recall"
    last = "last"


class Precision(StrEnum):
    """The forward pass's precision in training (``train.precision``)."""

    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class SynthConfig:
    """Synthetic DeepPCB-format boards: the embedded default dataset."""

    n_boards: int = 200
    size: int = 640
    defects: list[int] = field(default_factory=lambda: [3, 12])
    defect_rate: float = 1.0
    nuisance: list[int] = field(default_factory=lambda: [4, 10])
    seed: int = 0


@dataclass
class SplitConfig:
    """How samples are divided into train / val / test.

    ``val`` and ``test`` are the fractions of samples assigned to validation and test; the rest is training.
    ``seed`` seeds the assignment. ``group_by`` is the unit of assignment: ``none`` assigns each sample on its own
    (by a hash of its board id or path); ``design`` keeps whole groups (board designs: the manifest's ``group`` or
    the first path folder, :func:`training.snapshot.sample_group`) in one split, so val and test measure boards of
    designs the model never trained on. ``val_groups`` / ``test_groups`` (``design`` only) pin named groups to val /
    test before the fractions fill up with further groups (leave-design-out: ``test_groups=[group44000] test=0.0``).
    See :func:`training.snapshot.assign_group_splits`.
    """

    val: float = 0.15
    test: float = 0.2
    seed: int = 0
    group_by: GroupBy = GroupBy.none
    val_groups: list[str] = field(default_factory=list)
    test_groups: list[str] = field(default_factory=list)


@dataclass
class CandidateConfig:
    """AOI candidate step: template differencing, labelling of candidates and crop geometry.

    ``box_margin`` grows a candidate box into the reported detection box (DeepPCB's boxes are the defect's tight box
    plus ~10 px: the default pad 4 + margin 6); ``align`` corrects template/tested misregistration up to
    ``max_shift`` px before differencing (crops use the aligned template); groups longer than ``split_side`` px are
    re-opened to separate a defect from a misregistration strip fused to it. ``tolerance`` > 0 compares with a
    position tolerance of that many px, and ``exact_min_area`` > 0 then adds the exact difference's blobs of at least
    that size that the tolerant pass missed (hairline defects); ``close_min_area`` > 0 adds the blobs of the
    difference closed (3x3) before its cleanup that no candidate covers (IoU below ``close_max_iou``): dithered or
    broken thin lines the cleanup would erase; ``blob_min_area`` > 0 adds whole blobs of the uncleaned
    difference (``blob_min_side`` to ``blob_max_side`` px long) that no candidate already covers (IoU below
    ``blob_max_iou``): long thin defects that the cleanup breaks into fragments. See
    ``defectops.training.candidates.find_candidates``.
    """

    threshold: int = 64
    min_area: int = 4
    pad: int = 4
    merge_distance: int = 3
    max_candidates: int = 200
    iou_threshold: float = 0.1
    crop_size: int = 64
    context: float = 2.0
    box_margin: int = 6
    align: bool = True
    max_shift: int = 8
    split_side: int = 64
    tolerance: int = 0
    exact_min_area: int = 0
    close_min_area: int = 0
    close_max_iou: float = 0.3
    blob_min_area: int = 0
    blob_min_side: int = 60
    blob_max_side: int = 250
    blob_max_iou: float = 0.5
    add_missed_to_train: bool = True


CANDIDATE_PARAMS: tuple[str, ...] = (
    "threshold", "min_area", "pad", "merge_distance", "max_candidates", "align", "max_shift", "split_side",
    "tolerance", "exact_min_area", "close_min_area", "close_max_iou", "blob_min_area", "blob_min_side",
    "blob_max_side", "blob_max_iou")
"""The fields of :class:`CandidateConfig` that candidate generation reads (``training.candidates.find_candidates``);
their defaults are the only defaults. The rest (``crop_size``, ``context``, ``box_margin`` ...) shape crops and
boxes."""


@dataclass
class ValidationConfig:
    """Snapshot validation limits.

    The bad-file budget bounds the samples quarantined as unusable or leaking (corrupt, truncated, oversized, escaping
    the dataset root, unknown label, the same content in two splits ...): at most
    ``min(floor(max_bad_fraction * samples), floor(max_class_loss * samples of the smallest class))``
    (:func:`training.validation.bad_file_budget`; classes are the manifest labels, all board pairs one class). So a
    few bad files in a large dataset (1 %) are quarantined, listed as a warning and in the report, and the run goes
    on, but never so many that a class could lose more than ``max_class_loss`` (10 %) of its samples, however they
    fall; a class of fewer than 10 samples tolerates none. Over the budget ``validate_data`` fails naming the budget
    and the first reason. ``max_bad_fraction=0`` restores "one bad file fails the run".

    ``max_conflict_fraction`` bounds, separately, the samples quarantined as
    label conflicts (the same content under two labels; every copy is quarantined). Conflicts are counted apart
    because they are a question about labels, not broken data: quarantining every copy already keeps the ambiguity
    out of training and evaluation, and a few are usual in hand-sorted crop exports, so the first run on such a
    folder should go through and report them; a dataset that is mostly conflicts (class folders copied into each
    other) still stops.
    """

    max_image_pixels: int = 4096 * 4096
    max_file_bytes: int = 50 * 1024 * 1024
    max_bad_fraction: float = 0.01
    max_class_loss: float = 0.1
    max_conflict_fraction: float = 0.02


@dataclass
class DedupConfig:
    """Duplicate handling of the folder importer (:func:`training.importers.import_folder`).

    Identical files always form a group (by SHA-256) that never straddles two splits; copies within one class are
    kept once. ``near`` also groups near-identical images (re-encoded, resized, brightened copies): a 64-bit DCT
    perceptual hash per image, joined when their Hamming distance is at most ``max_distance`` (of 64 bits), so that
    such a group stays in one split too. Near-duplicates are kept, only grouped.
    """

    near: bool = False
    max_distance: int = 4


@dataclass
class ShortcutConfig:
    """The shortcut check of ``validate_data`` (:mod:`evaluation.shortcut`): before training, a depth-3 decision tree
    is cross-validated (``folds``) on the train and val samples' metadata alone (folder images: width, height, aspect,
    file bytes, format, mode; board crops: the candidate box's width, height, aspect, area). When its chance-corrected
    balanced accuracy reaches ``warn_at`` (0 = chance, 1 = perfect; 0.5 = halfway) the step warns in the terminal
    and in ``report.html`` that the model can learn the metadata instead of the defect. It never fails the run;
    ``enabled: false`` skips it."""

    enabled: bool = True
    warn_at: float = 0.5
    folds: int = 5


@dataclass
class DataConfig:
    """Where the data comes from (``synth``, ``deeppcb``, ``folder``, ``yolo_seg`` or ``snapshot`` with ``root``), how
    candidates are made from boards, how snapshots are validated and how a folder dataset's duplicates are grouped
    (``dedup``).

    ``shortcut`` configures the pre-training check that metadata (image size, file type, box size) does not predict
    the class: see :class:`ShortcutConfig`.
    """

    source: DataSource = DataSource.synth
    root: str | None = None
    list_file: str = "trainval.txt"
    good_class: str = "false_call"
    fit_mode: FitMode = FitMode.letterbox
    synth: SynthConfig = field(default_factory=SynthConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)


@dataclass
class AnomalyConfig:
    """``task=anomaly``: the anomaly model (:data:`training.models.patchcore.ANOMALY_MODELS`), its input, its memory
    bank and its operating point.

    Images are resized to ``height`` x ``width`` (no letterbox: masks and maps stay aligned). The memory bank keeps a
    greedy coreset of ``coreset_ratio`` of the good training patches, at most ``max_bank``, chosen from a seeded
    sample of at most ``max_patches`` patches (the selection's time grows with patches x bank size). The threshold is
    chosen on the val split for ``target_escape_rate`` (or, without defective val samples, ``false_call_budget``); the
    test split is then gated like a classifier's (``gates.max_escape_rate`` ...). An export is refused when an image
    score differs from the checkpoint's by more than ``max_score_rel_diff`` (relative) or a decision flips.

    On board pairs (DeepPCB format, synthetic boards) the templates are the good images and the tested images of val
    and test boards are scored; anomaly-map regions of at least ``box_min_area`` map pixels above a map threshold
    (chosen on val) become type-agnostic boxes, scored by the DeepPCB rule.

    The INT8 export (backbone only, ``export.int8``) holds when every val and test score is within
    ``int8_max_score_rel_diff`` of the checkpoint's (measured: 0.06 on the test model and on KolektorSDD), at most
    ``int8_max_flip_rate`` of those decisions at the threshold change and test passes the gates at the checkpoint's
    threshold; else FP32 is served.
    """

    model: str = "patchcore_effnet_lite0"
    weights: str | None = None
    layers: list[str] = field(default_factory=list)
    height: int = 256
    width: int = 256
    coreset_ratio: float = 0.01
    max_bank: int = 10000
    max_patches: int = 500000
    num_neighbors: int = 9
    batch_size: int = 8
    target_escape_rate: float = 0.02
    false_call_budget: float = 0.1
    max_score_rel_diff: float = 1e-3
    box_min_area: int = 4
    int8_max_score_rel_diff: float = 0.08
    int8_max_flip_rate: float = 0.01


@dataclass
class ModelConfig:
    """A model from the registry in ``defectops.training.models`` (timm backbones).

    ``tta`` is the test-time augmentation the trained model classifies with in eval mode (and in its ONNX export):
    ``none``, ``hflip`` (2 views), ``rot4`` (4 quarter turns) or ``d8`` (8 views); it costs that many forward passes.
    ``pretrained`` starts a registry entry that has pretrained weights (``aoi_effnet_lite0``) from them, read from a
    file on disk, never a hub; ``weights`` is a user's own state-dict file for the entry's timm architecture instead.
    """

    name: str = "aoi_resnet10t"
    drop_rate: float = 0.0
    kwargs: dict[str, str] = field(default_factory=dict)
    tta: Tta = Tta.none
    pretrained: bool = True
    weights: str | None = None


@dataclass
class LossConfig:
    """Focal loss; ``gamma=0`` and no ``alpha`` is exactly cross-entropy."""

    name: str = "focal"
    gamma: float = 2.0
    alpha: list[float] | None = None
    label_smoothing: float = 0.0


@dataclass
class AugmentConfig:
    """Albumentations pipeline for training crops (geometry only changes what PCB defects look like little)."""

    flips: bool = True
    rotate90: bool = True
    shift_px: int = 3
    noise: float = 0.0


@dataclass
class TrainConfig:
    """Optimisation: AdamW + cosine schedule with warm-up, class-balanced sampling, checkpoints every epoch.

    ``nproc`` > 1 trains with DistributedDataParallel in that many processes (torchrun; one per GPU, or gloo on CPU).
    ``select`` is the checkpoint the run keeps: ``val_macro_recall`` (the epoch with the best macro recall on the val
    split, ties to the later epoch; the last epoch when there is no val split) or ``last``.
    ``precision`` ``bf16`` runs the forward pass under bfloat16 autocast (weights, gradients and optimizer state stay
    float32), ``channels_last`` stores activations NHWC: on CPUs with AVX-512 BF16 (and on GPUs) together they speed
    a training step up by about 2x (``benchmarks/train_step.py``); neither changes the exported model.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    sampler: Sampler = Sampler.inverse_frequency
    sampler_beta: float = 0.999
    max_grad_norm: float | None = 5.0
    num_workers: int = 0
    threads: int = 0
    device: str = "auto"
    nproc: int = 1
    select: Select = Select.val_macro_recall
    precision: Precision = Precision.fp32
    channels_last: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
