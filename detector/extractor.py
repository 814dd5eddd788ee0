"""`RegionExtractor`: images -> bottom-up-attention regions (boxes, labels, scores, features).

Built like Detectron2's `DefaultPredictor` (config clone, `build_model`, `DetectionCheckpointer`,
eval mode, `ResizeShortestEdge`, BGR/RGB handling), but batched and with ONE forward pass per
batch: backbone -> RPN proposals -> ROI pooler + box head on the proposals -> box predictor ->
per-class NMS that keeps proposal indices -> the box-head features of the kept proposals are
gathered, never recomputed. Region selection follows bottom-up attention (Anderson et al. 2018,
`generate_tsv.py`): for every class, NMS over the proposals with that class's score; a proposal's
confidence is its best class score among the classes where it survived; proposals with
confidence >= SCORE_THRESH are kept, at least MIN_REGIONS and at most MAX_REGIONS, best
first; label = argmax over the foreground classes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes, ImageList
from torchvision.ops import batched_nms

from cpfean.data.region_store import RegionRecord
from cpfean.precision import native_bf16
from detector.config import get_label_names, get_region_cfg

logger = logging.getLogger(__name__)

__all__ = ["RegionExtractor", "check_weights_file", "file_sha256", "select_regions"]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _refuse_pickle(path: str) -> None:
    if path.endswith((".pkl", ".pyth")):
        raise ValueError(
            f"detector weights {path} are a Python pickle, which runs code when loaded; "
            f"convert them once with python -m pipelines.convert_weights {path}, then use "
            "the .pth it writes"
        )


def check_weights_file(path: str, expected_sha256: str | None = None) -> str:
    """The sha256 of a local weights file, checked before anything reads it as weights.

    Raises ValueError for a URL or catalog name (every default runs offline), a missing file, a
    pickle, or a checksum other than `expected_sha256`.
    """
    if "://" in path:
        raise ValueError(
            f"detector weights {path!r} must be a local file (nothing is downloaded at run time)"
        )
    if not os.path.isfile(path):
        raise ValueError(f"detector weights not found: {path}")
    _refuse_pickle(path)
    sha256 = file_sha256(path)
    if expected_sha256 and sha256 != expected_sha256:
        raise ValueError(
            f"detector weights {path} have sha256 {sha256[:12]}, expected "
            f"{expected_sha256[:12]}; refusing to load them"
        )
    return sha256


def _max_conf_after_nms(
    boxes: torch.Tensor, scores: torch.Tensor, floor: float, nms_thresh: float
) -> torch.Tensor:
    """Per proposal, the best class score among the classes where it survives per-class NMS.

    Args:
        boxes: [R, 4] (one box per proposal) or [R, K, 4] (one per proposal and class).
        scores: [R, K] foreground class probabilities.
        floor: (proposal, class) pairs scoring below this are left out of NMS. A pair can
            only be suppressed by a higher-scoring one, so pairs >= floor get the same result.
    Returns:
        [R] confidences (0 where a proposal survives no class).
    """
    r_idx, k_idx = (scores >= floor).nonzero(as_tuple=True)
    cand = boxes[r_idx] if boxes.dim() == 2 else boxes[r_idx, k_idx]
    cand_scores = scores[r_idx, k_idx]
    keep = batched_nms(cand.float(), cand_scores.float(), k_idx, nms_thresh)
    conf = torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    return conf.scatter_reduce(0, r_idx[keep], cand_scores[keep], reduce="amax")


def select_regions(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    score_thresh: float,
    nms_thresh: float,
    min_regions: int,
    max_regions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-up-attention region selection over one image's proposals.

    Args:
        boxes: [R, 4] or [R, K, 4] boxes the per-class NMS runs on.
        scores: [R, K] foreground class probabilities (background column removed).
    Returns:
        keep: [n] proposal indices, best first, n = clamp(#passing, min_regions, max_regions)
            capped by R; conf: [n] their confidences.
    """
    conf = _max_conf_after_nms(boxes, scores, score_thresh, nms_thresh)
    n_pass = int((conf >= score_thresh).sum()) if score_thresh > 0 else int((conf > 0).sum())
    if n_pass < min_regions and scores.shape[0] > n_pass:
        # too few confident regions: rank all the rest exactly as bottom-up attention does
        conf = _max_conf_after_nms(boxes, scores, 0.0, nms_thresh)
    order = torch.sort(conf, descending=True, stable=True).indices
    n = min(scores.shape[0], max(min_regions, min(n_pass, max_regions)))
    keep = order[:n]
    return keep, conf[keep]


class _RecordingCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` that loads tensors only and keeps the incompatible keys of its
    last load. Weights travel between people and unpickling runs code, so a pickle is refused
    (convert it once with `pipelines.convert_weights`) and a `.pth` is read with
    `weights_only=True`."""

    incompatible = None

    def _load_file(self, filename):
        _refuse_pickle(filename)
        return super()._load_file(filename)

    def _torch_load(self, f):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"detector weights {f} hold more than tensors and plain "
                f"containers, refused: {str(e).splitlines()[0]}"
            ) from None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def store_detector_files(
    store: str | os.PathLike, config: str | None = None, weights: str | None = None
) -> tuple[str, str, str | None]:
    """(config, weights, weights sha256) of the detector that wrote a region store: as given,
    else the config named in its meta or the demo layout (``detector/config.yaml`` and
    ``model_final.pth`` beside the store); weights "" = the config's own. ValueError when
    neither names a config."""
    from cpfean.data.region_store import RegionStore

    det: dict = {}
    try:
        det = RegionStore(store).meta.get("detector", {}) or {}
    except (OSError, ValueError):
        pass
    beside = Path(store).parent / "detector" / "config.yaml"
    config = config or (str(beside) if beside.is_file() else det.get("config"))
    if not config:
        raise ValueError(
            "cannot tell which detector made the index's regions; pass "
            "--detector-config and --detector-weights"
        )
    if not weights and Path(config).is_file():
        candidate = Path(config).parent / "model_final.pth"
        weights = str(candidate) if candidate.is_file() else ""
    return str(config), weights or "", det.get("weights_sha256")


class RegionExtractor:
    """Batched one-pass region extraction with a Detectron2 Faster R-CNN.

    `extractor(images) -> list[RegionRecord]`, one record per image, each with exactly
    `REGIONS.MAX_REGIONS` (R) slots: features [R, D], boxes [R, 4] xyxy in original-image pixels,
    labels [R] (-1 = padding), scores [R], image_hw, num_valid.

    Outputs depend slightly on batch composition (images in a batch are zero-padded to a common
    size), as in any batched Detectron2 inference.
    """

    def __init__(self, cfg: CfgNode, *, strict: bool = True, expected_sha256: str | None = None):
        """
        Args:
            cfg: a region config (`detector.config.get_region_cfg`). MODEL.WEIGHTS = "" keeps
                the random initialisation (tests, benchmarks).
            strict: raise when the checkpoint lacks weights the model needs.
            expected_sha256: refuse weights with another checksum, before reading them.
        """
        self.cfg = cfg.clone()  # cfg can be modified by model
        # full fp32 as the published features were computed; TF32 would round matmuls on Ampere
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.weights = self.cfg.MODEL.WEIGHTS
        sha256 = check_weights_file(self.weights, expected_sha256) if self.weights else None
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.weights:
            checkpointer = _RecordingCheckpointer(self.model)
            path = self.weights
            checkpointer.load(path)
            incompatible = checkpointer.incompatible
            if incompatible is not None:
                if strict and (incompatible.missing_keys or incompatible.incorrect_shapes):
                    raise RuntimeError(
                        f"checkpoint {self.weights} does not fit the model: missing "
                        f"{incompatible.missing_keys[:5]}, wrong shapes "
                        f"{[k for k, *_ in incompatible.incorrect_shapes][:5]}"
                    )
            self.weights_sha256 = sha256
        else:
            logger.warning("MODEL.WEIGHTS is empty: the detector is randomly initialised")
            self.weights_sha256 = "random-init"
        self.aug = T.ResizeShortestEdge(
            [self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MIN_SIZE_TEST],
            self.cfg.INPUT.MAX_SIZE_TEST,
        )
        self.input_format = self.cfg.INPUT.FORMAT
        assert self.input_format in ("RGB", "BGR"), self.input_format
        self.label_names = get_label_names(self.cfg)
        self.num_regions: int = self.cfg.REGIONS.MAX_REGIONS
        roi = self.model.roi_heads
        if not isinstance(roi, (StandardROIHeads, Res5ROIHeads)):
            raise TypeError(f"unsupported ROI heads {type(roi).__name__}")
        self.feature_dim = self._feature_dim()
        self.backbone_bf16 = bool(self.cfg.REGIONS.BACKBONE_BF16) and native_bf16(self.device)

    @classmethod
    def for_store(
        cls,
        store: str | os.PathLike,
        *,
        config: str | None = None,
        weights: str | None = None,
        device: str = "cpu",
    ) -> RegionExtractor:
        """The extractor of the detector that wrote the region store ``store`` (its files found
        by `store_detector_files`). Weights whose checksum is not the store's are refused
        before they are read (ValueError)."""
        config, weights, want = store_detector_files(store, config, weights)
        try:
            opts = [f"MODEL.DEVICE={device}"] + ([f"MODEL.WEIGHTS={weights}"] if weights else [])
            cfg = get_region_cfg(config, opts)  # no weights given: the config's own
            extractor = cls(cfg, expected_sha256=want if want != "random-init" else None)
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise ValueError(
                f"cannot build the detector from {config} with weights {weights or '(none)'}: {e}"
            ) from None
        if want and extractor.weights_sha256 != want:
            raise ValueError(
                f"detector weights {weights or '(random init)'} (sha256 "
                f"{extractor.weights_sha256[:12]}) are not the ones that made the "
                f"index's regions (sha256 {want[:12]}); pass --detector-weights"
            )
        return extractor

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _feature_dim(self) -> int:
        roi = self.model.roi_heads
        source = self.cfg.REGIONS.FEATURE_SOURCE
        if isinstance(roi, Res5ROIHeads):
            res5_out = roi.box_predictor.cls_score.in_features
            return res5_out if source == "box_head" else res5_out // 2
        if source == "box_head":
            return roi.box_head.output_shape.channels
        return self.model.backbone.output_shape()[roi.box_in_features[0]].channels

    @property
    def meta(self) -> dict:
        """Region-store meta describing this extractor (for `RegionWriter`)."""
        r = self.cfg.REGIONS
        return {
            "num_regions": self.num_regions,
            "feature_dim": self.feature_dim,
            "label_names": list(self.label_names),
            "detector": {
                "config": r.CONFIG_NAME,
                "weights_sha256": self.weights_sha256,
                "feature_source": r.FEATURE_SOURCE,
                "box_source": r.BOX_SOURCE,
                # only when set, so that float32 stores of earlier versions still resume
                **({"backbone_dtype": "bfloat16"} if self.backbone_bf16 else {}),
            },
            "thresholds": {
                "score": r.SCORE_THRESH,
                "nms": r.NMS_THRESH,
                "min_regions": r.MIN_REGIONS,
                "max_regions": r.MAX_REGIONS,
            },
        }

    def _prepare(self, image: np.ndarray, image_format: str) -> dict:
        """One HxWx3 uint8 image -> the model's input dict (resized CHW tensor, orig size)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def _box_features(
        self, features: dict[str, torch.Tensor], boxes: list[Boxes]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ROI pooling + box head for `boxes` (resized-image coordinates).

        Returns:
            head: [sum R, C] the box predictor's input; region: [sum R, D] the region feature.
        """
        roi = self.model.roi_heads
        if isinstance(roi, Res5ROIHeads):
            pooled = roi.pooler([features[f] for f in roi.in_features], boxes)
            head = roi.res5(pooled).mean(dim=[2, 3])  # (sum R, 2048)
        else:
            pooled = roi.box_pooler([features[f] for f in roi.box_in_features], boxes)
            head = roi.box_head(pooled)  # (sum R, FC_DIM)
        if self.cfg.REGIONS.FEATURE_SOURCE == "box_head":
            return head, head
        return head, pooled.mean(dim=[2, 3])

    def _preprocess(
        self, images: Sequence[np.ndarray], image_format: str
    ) -> tuple[list[dict], ImageList, dict[str, torch.Tensor]]:
        inputs = [self._prepare(img, image_format) for img in images]
        batch = self.model.preprocess_image(inputs)
        if not self.backbone_bf16:
            return inputs, batch, self.model.backbone(batch.tensor)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            features = self.model.backbone(batch.tensor)
        return inputs, batch, {k: v.float() for k, v in features.items()}

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], image_format: str = "BGR"
    ) -> list[dict[str, torch.Tensor]]:
        """Regions of a batch of images (unpadded), in one forward pass.

        Args:
            images: HxWx3 uint8 arrays, channel order `image_format` ("BGR" or "RGB").
        Returns:
            Per image a dict: boxes [n, 4] xyxy original pixels, labels [n], scores [n],
            features [n, D], proposal_index [n] (kept proposals), image_hw (h, w); n <= R.
        """
        if not len(images):
            return []
        inputs, batch, features = self._preprocess(images, image_format)
        proposals, _ = self.model.proposal_generator(batch, features, None)
        proposal_boxes = [p.proposal_boxes for p in proposals]
        head, region = self._box_features(features, proposal_boxes)
        predictor = self.model.roi_heads.box_predictor
        predictions = predictor(head)
        probs = predictor.predict_probs(predictions, proposals)
        class_boxes = predictor.predict_boxes(predictions, proposals)
        region = region.split([len(p) for p in proposals])
        r = self.cfg.REGIONS
        out = []
        for i, (inp, props) in enumerate(zip(inputs, proposals, strict=True)):
            scores = probs[i][:, :-1]  # (R, K): background is the last column
            resized_hw = batch.image_sizes[i]
            num_reg = class_boxes[i].shape[1] // 4  # K, or 1 when class-agnostic
            cls_boxes = Boxes(class_boxes[i].reshape(-1, 4))
            cls_boxes.clip(resized_hw)
            cls_boxes = cls_boxes.tensor.view(len(props), num_reg, 4)  # (R, K or 1, 4)
            nms_boxes = (
                props.proposal_boxes.tensor
                if r.BOX_SOURCE == "proposal"
                else (cls_boxes if cls_boxes.shape[1] > 1 else cls_boxes[:, 0])
            )
            keep, conf = select_regions(
                nms_boxes,
                scores,
                score_thresh=r.SCORE_THRESH,
                nms_thresh=r.NMS_THRESH,
                min_regions=r.MIN_REGIONS,
                max_regions=r.MAX_REGIONS,
            )
            labels = scores[keep].argmax(dim=1) if len(keep) else keep.new_zeros(0)
            if r.BOX_SOURCE == "proposal":
                boxes = props.proposal_boxes.tensor[keep]
            else:
                boxes = cls_boxes[keep, labels if cls_boxes.shape[1] > 1 else 0]
            h, w = inp["height"], inp["width"]
            out.append(
                {
                    "boxes": self._to_original(boxes, resized_hw, (h, w)),
                    "labels": labels,
                    "scores": conf,
                    "features": region[i][keep],
                    "proposal_index": keep,
                    "image_hw": (h, w),
                }
            )
        return out

    @staticmethod
    def _to_original(
        boxes: torch.Tensor, resized_hw: tuple[int, int], image_hw: tuple[int, int]
    ) -> torch.Tensor:
        """[n, 4] resized-image boxes -> original-image pixels, clipped to the image."""
        b = Boxes(boxes.clone())
        b.scale(image_hw[1] / resized_hw[1], image_hw[0] / resized_hw[0])
        b.clip(image_hw)
        return b.tensor

    @torch.no_grad()
    def features_for_boxes(
        self, image: np.ndarray, boxes: np.ndarray | torch.Tensor, image_format: str = "BGR"
    ) -> torch.Tensor:
        """Region features of given boxes, by a separate full forward pass (two-pass baseline).

        Args:
            image: HxWx3 uint8; boxes: [n, 4] xyxy in original-image pixels.
        Returns:
            [n, D] features, the same kind `detect` gathers.
        """
        inputs, batch, features = self._preprocess([image], image_format)
        h, w = inputs[0]["height"], inputs[0]["width"]
        rh, rw = batch.image_sizes[0]
        b = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).clone()
        b *= torch.tensor([rw / w, rh / h, rw / w, rh / h], device=self.device)
        _, region = self._box_features(features, [Boxes(b)])
        return region

    def to_records(self, detections: Sequence[dict[str, torch.Tensor]]) -> list[RegionRecord]:
        """`detect` outputs -> padded `RegionRecord`s."""
        return [
            RegionRecord.from_detections(
                d["features"].float().cpu(),
                d["boxes"].cpu(),
                d["labels"].cpu(),
                d["scores"].float().cpu(),
                d["image_hw"],
                num_regions=self.num_regions,
            )
            for d in detections
        ]

    def __call__(
        self, images: Sequence[np.ndarray], image_format: str = "BGR"
    ) -> list[RegionRecord]:
        """Images (HxWx3 uint8, `image_format` order) -> one `RegionRecord` each."""
        return self.to_records(self.detect(images, image_format))

    def extract_one(self, image: np.ndarray, image_format: str = "BGR") -> RegionRecord:
        """One query image's record, without the libraries' deprecation chatter (a query's
        user cannot act on it)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self([image], image_format)[0]
