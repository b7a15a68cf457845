"""torch.hub entry points: every registered BOAT model, e.g.
``torch.hub.load('/path/to/boatvit', 'boat_swin_tiny_224', source='local', num_classes=10)``.

Each entry point is the timm registry's own function (``pretrained`` plus any constructor or timm argument).
Names are private here (``_timm``) because torch.hub lists every public callable of this module as a model.
"""

import timm as _timm

import boatvit as _boatvit  # noqa: F401  (registers the boat_* names with timm)

dependencies = ['torch', 'timm']

globals().update({_name: _timm.models.model_entrypoint(_name) for _name in _timm.list_models('boat_*')})
