"""What the feature-space local attention does, drawn (``boatvit clusters``).

For each chosen FSLA layer, the model's input image beside one panel per head in which every token is coloured by
the cluster the balanced hierarchical clustering put it in. Tokens of one cluster attend to each other (and to 20
tokens of the sibling cluster), wherever they are in the image.

The clustering is recomputed from the layer's own input: a pre-hook on each `FeatureSpaceAttention` takes the
tokens and the ``(H, W)`` grid it is called with, projects the queries with the layer's ``qkv`` and clusters them
with the layer's own parameters, exactly as its forward does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .clustering import cluster_layout, token_slots
from .data import eval_data_config, eval_transform, open_image, require_extra
from .errors import UnreadableImageError, UsageError
from .fsla import FeatureSpaceAttention
from .runs import atomic_path
from .weights import build_model, check_boat_name, load_model

__all__ = [
    'fsla_layers',
    'first_layer_per_stage',
    'choose_layers',
    'LayerClusters',
    'cluster_slots',
    'cluster_labels',
    'plot_clusters',
    'ClusterModel',
    'open_cluster_model',
    'check_output_folder',
    'none_readable',
    'ClusterDrawings',
    'draw_clusters',
]

DPI = 64
MAX_DEFAULT_HEADS = 4
_GOLDEN = 0.618033988749895


def fsla_layers(model: torch.nn.Module) -> Dict[str, FeatureSpaceAttention]:
    """Every feature-space attention module by its name (``layers.0.blocks.1.fsla``), in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FeatureSpaceAttention)}


def first_layer_per_stage(names: Sequence[str]) -> List[str]:
    """The first FSLA layer of each stage (``layers.{i}.*``) among ``names``."""
    firsts = {}
    for name in names:
        firsts.setdefault(name.split('.')[1], name)
    return list(firsts.values())


@dataclasses.dataclass
class LayerClusters:
    """One FSLA layer's clustering of a batch, as its forward uses it.

    Attributes:
        slots: ``(B, heads, h, w)`` int64, every token's slot in the padded clustered order
            (`boatvit.clustering.token_slots`): cluster ``k`` holds slots ``k * cluster_size`` to
            ``(k + 1) * cluster_size - 1``.
        cluster_size: slots per cluster (the layer's clusters' padded size, not its ``cluster_size`` argument).
        overlap: the sibling tokens a cluster's queries also attend to: cluster ``2j`` the first ``overlap`` slots of
            cluster ``2j+1``, cluster ``2j+1`` the last ``overlap`` slots of cluster ``2j``.
    """

    slots: torch.Tensor
    cluster_size: int
    overlap: int

    @property
    def labels(self) -> torch.Tensor:
        """``(B, heads, h, w)``: the cluster of every token."""
        return self.slots // self.cluster_size


@torch.inference_mode()
def cluster_slots(
    model: torch.nn.Module, images: torch.Tensor, layers: Sequence[str]
) -> Tuple[torch.Tensor, Dict[str, LayerClusters]]:
    """Run ``model`` on ``images`` and take the clustering of every named FSLA layer.

    Args:
        model: a BOAT model.
        images: ``(B, 3, H, W)`` normalised input.
        layers: FSLA module names (see `fsla_layers`).

    Returns:
        The model's output (logits, or features for a model without a classifier) and ``{name: LayerClusters}``.
    """
    modules = fsla_layers(model)
    clusters = {}

    def capture(name: str):
        def hook(module: FeatureSpaceAttention, args) -> None:
            x, (H, W) = args
            slots = token_slots(module.cluster_order(x, (H, W)), module.cluster_size)
            padded = cluster_layout(H * W, module.cluster_size).cluster_size
            clusters[name] = LayerClusters(slots.view(x.shape[0], module.num_heads, H, W).cpu(), padded, module.overlap)

        return hook

    handles = [modules[name].register_forward_pre_hook(capture(name)) for name in layers]
    try:
        output = model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    return output, clusters


def cluster_labels(model: torch.nn.Module, images: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The cluster of every token at each named FSLA layer.

    Args:
        model: a BOAT model.
        images: ``(B, 3, H, W)`` normalised input.
        layers: FSLA module names (see `fsla_layers`).

    Returns:
        ``{name: (B, heads, h, w) int64}``: the index of each token's cluster in the layer's ``h x w`` token grid;
        clusters ``2j`` and ``2j+1`` are siblings of the last split.
    """
    return {name: clusters.labels for name, clusters in cluster_slots(model, images, layers)[1].items()}


def _palette(n: int) -> np.ndarray:
    """``n`` RGB colours; hues step by the golden ratio so sibling clusters (consecutive indices) look different."""
    from matplotlib.colors import hsv_to_rgb

    hues = (np.arange(n) * _GOLDEN) % 1.0
    return hsv_to_rgb(np.stack([hues, np.full(n, 0.75), np.full(n, 0.95)], axis=-1))


def _overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image tinted by each pixel's token cluster, with darkened cluster borders."""
    height, width = image.shape[:2]
    h, w = labels.shape
    per_pixel = labels[(np.arange(height) * h // height)[:, None], (np.arange(width) * w // width)[None, :]]
    tinted = (1 - alpha) * image + alpha * _palette(int(labels.max()) + 1)[per_pixel]
    border = np.zeros((height, width), dtype=bool)
    border[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
    border[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
    tinted[border] *= 0.3
    return tinted


def plot_clusters(
    image: np.ndarray,
    labels: Dict[str, torch.Tensor],
    path: Path,
    heads: Optional[Sequence[int]] = None,
    panel_px: int = 256,
) -> None:
    """Draw one row per layer: the image, then the chosen heads' clusters; written atomically as a PNG.

    Args:
        image: ``(H, W, 3)`` floats in [0, 1], the model's input.
        labels: ``{layer: (heads, h, w)}`` from `cluster_labels` (one image).
        path: the PNG to write; it is ``(1 + shown heads) * panel_px`` wide and ``len(labels) * panel_px`` high.
        heads: head indices to show where a layer has them; default: the first 4 of each layer.
        panel_px: side of each panel in pixels.
    """
    require_extra('matplotlib', 'matplotlib', 'drawing clusters')
    from matplotlib.figure import Figure  # imported here: slow to import, and optional

    shown = {
        name: [h for h in (heads if heads is not None else range(MAX_DEFAULT_HEADS)) if h < lab.shape[0]]
        for name, lab in labels.items()
    }
    cols = 1 + max(len(h) for h in shown.values())
    fig = Figure(figsize=(cols * panel_px / DPI, len(labels) * panel_px / DPI), dpi=DPI, layout='constrained')
    axes = fig.subplots(len(labels), cols, squeeze=False)
    for row, (name, lab) in zip(axes, labels.items()):
        row[0].imshow(image)
        row[0].set_title(f'{name}\n{lab.shape[1]}x{lab.shape[2]} tokens', fontsize=9)
        for ax, head in zip(row[1:], shown[name]):
            ax.imshow(_overlay(image, lab[head].numpy()))
            ax.set_title(f'head {head}: {int(lab[head].max()) + 1} clusters', fontsize=9)
        for ax in row:
            ax.set_axis_off()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=DPI)  # a bare Figure renders with Agg: no display needed


def choose_layers(available: Sequence[str], requested: Optional[Sequence[str]]) -> List[str]:
    """The FSLA layers to draw: the first of each stage by default, ``['all']`` for all, else the named ones
    (``layers.0.blocks.1`` or with ``.fsla``)."""
    if not requested:
        return first_layer_per_stage(available)
    if list(requested) == ['all']:
        return list(available)
    chosen = []
    for name in requested:
        full = name if name.endswith('.fsla') else f'{name}.fsla'
        if full not in available:
            raise UsageError(
                f'--layer {name}: no feature-space attention there; the FSLA layers are '
                f'{", ".join(n[: -len(".fsla")] for n in available)} (or pass --layer all)'
            )
        chosen.append(full)
    return chosen


@dataclasses.dataclass
class ClusterModel:
    """A model opened to look at its clusters (`open_cluster_model`).

    Attributes:
        model: the model, in eval mode.
        name: its registered name.
        metadata: what its weights record (class names, data config); {} for an untrained model.
        layers: the chosen FSLA layers (`choose_layers`).
        transform: PIL image to the model's normalised ``(3, H, W)`` input.
    """

    model: torch.nn.Module
    name: str
    metadata: Dict[str, Any]
    layers: List[str]
    transform: Callable[[Image.Image], torch.Tensor]

    def plain(self, pixels: torch.Tensor) -> np.ndarray:
        """The normalised input ``(3, H, W)`` as the ``(H, W, 3)`` image in [0, 1] the model saw."""
        config = eval_data_config(self.model, self.metadata)
        mean, std = torch.tensor(config['mean'])[:, None, None], torch.tensor(config['std'])[:, None, None]
        return (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def inputs(self, paths: Sequence[Path], skipped: List[str]) -> Iterator[Tuple[int, torch.Tensor]]:
        """The index in ``paths`` of each readable image, with its normalised input. Of several images the unreadable
        ones are left out, their reasons appended to ``skipped``; a single unreadable image raises."""
        for i, path in enumerate(paths):
            try:
                yield i, self.transform(open_image(path))
            except UnreadableImageError as e:
                if len(paths) == 1:
                    raise
                skipped.append(str(e))


def open_cluster_model(
    weights: Optional[Union[str, os.PathLike]] = None,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    layers: Optional[Sequence[str]] = None,
) -> ClusterModel:
    """Load a model to look at its clusters: weights from any source (`boatvit.weights.load_model`), else an
    untrained ``model``; ``layers`` as `choose_layers` takes them.

    Raises:
        UsageError: bad weights, neither weights nor a model, a model without feature-space attention or a layer
            without it, each named.
    """
    metadata: Dict[str, Any] = {}
    if weights:
        loaded = load_model(weights, model=model, model_kwargs=model_kwargs, use_ema=use_ema)
        built, name, metadata = loaded.model, loaded.name, loaded.metadata
    elif model:
        name = check_boat_name(model)
        built = build_model(name, num_classes=0, model_kwargs=model_kwargs).eval()
    else:
        raise UsageError('pass --weights PATH, or --model NAME to look at an untrained model')
    modules = fsla_layers(built)
    if not modules:
        raise UsageError(f'{name} has no feature-space attention layers; pick a model with FSLA (fsla_blocks)')
    return ClusterModel(built, name, metadata, choose_layers(list(modules), layers), eval_transform(built, metadata))


def check_output_folder(out: Path) -> None:
    """A `UsageError` naming ``out`` when the folder it is to be written in does not exist."""
    if not out.parent.is_dir():
        raise UsageError(f'{out}: the directory {out.parent} does not exist; create it first')


def none_readable(paths: Sequence[Path], skipped: Sequence[str]) -> UnreadableImageError:
    """The error for several images none of which could be read."""
    return UnreadableImageError(f'none of the {len(paths)} images could be read: {"; ".join(skipped[:3])}')


@dataclasses.dataclass
class ClusterDrawings:
    """What `draw_clusters` did: the model name, the layers drawn, the PNGs written (one per readable image) and
    the reasons the unreadable images were skipped."""

    name: str
    layers: List[str]
    written: List[Path]
    skipped: List[str]


def draw_clusters(
    images: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    out: Union[str, os.PathLike],
    weights: Optional[Union[str, os.PathLike]] = None,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    layers: Optional[Sequence[str]] = None,
    heads: Optional[Sequence[int]] = None,
    panel_px: int = 256,
) -> ClusterDrawings:
    """Draw the clusters of images at chosen FSLA layers of a model into PNGs (see `plot_clusters`).

    Args:
        images: an image file, or several.
        out: the ``.png`` to write for one image; for several, the directory to write ``<image stem>.png`` into.
        weights: any weight source (`boatvit.weights.load_model`); None draws an untrained ``model``.
        model, model_kwargs, use_ema: see `boatvit.weights.load_model`.
        layers: see `choose_layers`.
        heads, panel_px: see `plot_clusters`.

    Returns:
        `ClusterDrawings`; of several images, the unreadable ones are skipped with their reason.

    Raises:
        UsageError: bad arguments or weights, named; an unreadable image when it is the only one, or when none of
            several could be read (`boatvit.errors.UnreadableImageError`).
    """
    several = not isinstance(images, (str, os.PathLike))
    paths = [Path(p) for p in images] if several else [Path(images)]
    out = Path(out)
    if several:
        if not out.is_dir():
            raise UsageError(f'{out}: with several images, -o must be an existing directory for one PNG per image')
        targets = _png_names(paths, out)
    else:
        if out.suffix.lower() != '.png':
            raise UsageError(f'{out}: the output must be a .png file (or .html for the interactive page)')
        check_output_folder(out)
        targets = [out]
    if panel_px < 64:
        raise UsageError(f'--panel-size must be at least 64 pixels, got {panel_px}')
    opened = open_cluster_model(weights, model, model_kwargs, use_ema, layers)
    modules = fsla_layers(opened.model)
    max_heads = max(modules[n].num_heads for n in opened.layers)
    bad = [h for h in heads or () if not 0 <= h < max_heads]
    if bad:
        raise UsageError(f'--heads {bad}: the chosen layers have at most {max_heads} heads (0 to {max_heads - 1})')

    drawings = ClusterDrawings(opened.name, opened.layers, [], [])
    for i, pixels in opened.inputs(paths, drawings.skipped):
        labels = cluster_labels(opened.model, pixels[None], opened.layers)
        target = targets[i]
        plot_clusters(opened.plain(pixels), {n: lab[0] for n, lab in labels.items()}, target, heads, panel_px)
        drawings.written.append(target)
    if not drawings.written:
        raise none_readable(paths, drawings.skipped)
    return drawings


def _png_names(paths: Sequence[Path], out: Path) -> List[Path]:
    """``out/<stem>.png`` for each image, ``<stem>-2.png`` ... when stems repeat."""
    seen: Dict[str, int] = {}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(out / (f'{path.stem}.png' if seen[path.stem] == 1 else f'{path.stem}-{seen[path.stem]}.png'))
    return names
