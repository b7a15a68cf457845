"""The Hugging Face hub layout for BOAT models: a folder timm (``local-dir:``) and transformers load.

timm's ``save_for_hf`` writes it: ``config.json`` (``architecture``, ``num_classes``, ``label_names``, the
architecture's ``model_args`` and the ``pretrained_cfg`` data config) and ``model.safetensors``. Upload the folder with
``huggingface_hub.upload_folder`` (or write and upload at once with ``timm.models.push_to_hf_hub``).

timm and transformers find architectures in timm's registry, which only holds ``boat_*`` names once ``boatvit`` is
imported; neither has a plug-in mechanism that would import it from the saved config. So the reader needs one line,
``import boatvit``, before ``timm.create_model('local-dir:...')`` or ``from_pretrained``; the config's
``pretrained_cfg['notes']`` says so.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import timm
from timm.utils import unwrap_model
from torch import nn

from .data import eval_data_config
from .models import BoatTransformer
from .weights import load_model

__all__ = ['HUB_NOTE', 'export_hub', 'save_hub_format']

HUB_NOTE = (
    'boatvit model: `pip install boatvit`, then `import boatvit` before timm.create_model or transformers '
    "from_pretrained (it registers the boat_* architectures with timm; otherwise they are 'Unknown model')"
)


def save_hub_format(
    model: nn.Module,
    directory: Union[str, Path],
    label_names: Optional[Sequence[str]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in timm's hub layout (``config.json`` + ``model.safetensors``) to ``directory``.

    Args:
        model: a BOAT classifier made by ``timm.create_model`` (its ``pretrained_cfg`` names the architecture and
            gives the data config), with its weights; a DDP or compiled wrapper is unwrapped.
        directory: the folder to write (created if missing).
        label_names: one name per class (``num_classes`` of them), stored as ``label_names`` (transformers'
            ``id2label``); None keeps the model's own when its class count is unchanged (timm's rule).
        overwrite: replace an existing ``config.json`` in ``directory``.

    Returns:
        The folder, loadable with ``timm.create_model(f'local-dir:{directory}')`` and transformers'
        ``AutoModelForImageClassification.from_pretrained(directory)`` (after ``import boatvit``).
    """
    model = unwrap_model(model)
    if not isinstance(model, BoatTransformer):
        raise ValueError(
            f'save_hub_format takes a BOAT classifier, got {type(model).__name__}; '
            'for a features_only model save the classifier it was built from.'
        )
    if not getattr(model, 'pretrained_cfg', None) or not model.pretrained_cfg.get('architecture'):
        raise ValueError(
            'save_hub_format needs a model made by timm.create_model (its pretrained_cfg names the '
            f'architecture); build it with timm.create_model("boat_{model.family}_tiny_224", ...) and '
            'load the weights into it.'
        )
    if label_names is not None:
        label_names = list(label_names)
        if len(label_names) != model.num_classes or not all(isinstance(n, str) for n in label_names):
            raise ValueError(
                f'label_names must be {model.num_classes} strings (one per class of the model), got '
                f'{len(label_names)} items.'
            )
    directory = Path(directory)
    if (directory / 'config.json').exists() and not overwrite:
        raise FileExistsError(f'{directory / "config.json"} exists; pass overwrite=True or choose another folder.')
    model_config = dict(pretrained_cfg=dict(notes=(HUB_NOTE,)))
    if label_names is not None:
        model_config['label_names'] = label_names
    timm.models.save_for_hf(model, directory, model_config=model_config, safe_serialization=True)
    # timm (1.0.31) also writes num_classes into model_args, and transformers' TimmWrapper passes num_classes besides
    # model_args ('got multiple values for keyword argument'); timm reads it from the top level and pretrained_cfg
    config_path = directory / 'config.json'
    config = json.loads(config_path.read_text())
    config['model_args'].pop('num_classes', None)
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def export_hub(
    source: Union[str, os.PathLike],
    directory: Union[str, Path],
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Any weight source (`boatvit.weights.read_weights`: a released checkpoint, a converted file, a run) in timm's
    hub layout, with what the source records about its model: the class names (``label_names``) and the data
    config a fine-tuned run was trained with (input size, mean, std, crop, interpolation).

    Returns:
        ``{'model', 'directory', 'num_classes', 'label_names' (or None), 'input_size'}``.
    """
    loaded = load_model(source, model, model_kwargs, use_ema=use_ema)
    net = loaded.model
    data_config = eval_data_config(net, loaded.metadata)
    net.pretrained_cfg = dict(net.pretrained_cfg, **data_config)
    classes = loaded.metadata.get('classes')
    label_names = classes if classes and len(classes) == net.num_classes else None
    save_hub_format(net, directory, label_names=label_names, overwrite=overwrite)
    return {
        'model': loaded.name,
        'directory': Path(directory),
        'num_classes': net.num_classes,
        'label_names': label_names,
        'input_size': tuple(data_config['input_size']),
    }
