"""boatvit.backbones under torchvision's real detectors (Faster / Mask R-CNN, RetinaNet), reduced widths."""

import math

import pytest
import timm
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import boatvit  # noqa: F401  (registers the models)
from boatvit.backbones import boat_fpn_backbone

from reduced_models import FAMILIES, reduced_kwargs

SMALL = {name: reduced_kwargs(name) for name in FAMILIES.values()}
# the detectors' own resizing keeps images small; size_divisible=1 keeps their sizes off multiples of 32
SMALL_DETECTOR = dict(
    min_size=96,
    max_size=160,
    size_divisible=1,
    rpn_pre_nms_top_n_train=64,
    rpn_post_nms_top_n_train=32,
    rpn_pre_nms_top_n_test=64,
    rpn_post_nms_top_n_test=32,
    box_batch_size_per_image=32,
    box_detections_per_img=10,
)


def _stage_sizes(name: str, size: int) -> list:
    """Independent arithmetic of each stage's map size: BOAT-Swin pads to its patches (ceil), BOAT-CSWin's stem is a
    7x7 stride-4 convolution with padding 2 and its merges 3x3 stride-2 convolutions with padding 1."""
    size = math.ceil(size / 4) if 'cswin' not in name else (size + 4 - 7) // 4 + 1
    sizes = [size]
    for _ in range(3):
        size = (size - 1) // 2 + 1
        sizes.append(size)
    return sizes


def _images_and_targets():
    torch.manual_seed(0)
    images = [torch.rand(3, 90, 130), torch.rand(3, 121, 99)]
    masks = [torch.zeros(1, 90, 130, dtype=torch.uint8), torch.zeros(2, 121, 99, dtype=torch.uint8)]
    masks[0][0, 10:60, 10:50] = 1
    masks[1][0, 20:90, 5:70] = 1
    masks[1][1, 30:80, 30:60] = 1
    targets = [
        dict(boxes=torch.tensor([[10.0, 10, 50, 60]]), labels=torch.tensor([1]), masks=masks[0]),
        dict(boxes=torch.tensor([[5.0, 20, 70, 90], [30, 30, 60, 80]]), labels=torch.tensor([2, 1]), masks=masks[1]),
    ]
    return images, targets


@pytest.mark.parametrize('name', list(SMALL))
def test_feature_maps_are_nchw_with_the_stated_channels_and_strides(name):
    backbone = boat_fpn_backbone(name, out_channels=24, **SMALL[name])
    info = backbone.body.feature_info
    assert info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 100, 150)  # neither side a multiple of 32
    maps = backbone.body(x)
    for m, c, h, w in zip(maps, info.channels(), _stage_sizes(name, 100), _stage_sizes(name, 150)):
        assert m.shape == (2, c, h, w)
    pyramid = backbone(x)
    assert list(pyramid) == ['0', '1', '2', '3', 'pool']
    for level, m in zip(pyramid.values(), maps):
        assert level.shape == (2, 24, *m.shape[2:])
    assert pyramid['pool'].shape[2:] == tuple((s - 1) // 2 + 1 for s in maps[-1].shape[2:])


def test_trainable_layers_freezes_the_first_parts():
    backbone = boat_fpn_backbone('boat_swin_tiny_224', trainable_layers=2, **SMALL['boat_swin_tiny_224'])
    model = backbone.body.model
    frozen = [model.patch_embed, model.layers[0], model.layers[1]]
    assert not any(p.requires_grad for part in frozen for p in part.parameters())
    assert all(p.requires_grad for part in model.layers[2:] for p in part.parameters())
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    with pytest.raises(ValueError, match='trainable_layers must be between 0 and 5'):
        boat_fpn_backbone('boat_swin_tiny_224', trainable_layers=6, **SMALL['boat_swin_tiny_224'])


def test_a_model_built_by_the_user_is_pruned_to_the_requested_stages():
    model = timm.create_model('boat_cswin_tiny_224', dynamic_img_size=True, **SMALL['boat_cswin_tiny_224'])
    backbone = boat_fpn_backbone(model, out_indices=(1, 2), out_channels=16)
    assert backbone.body.feature_info.reduction() == [8, 16]
    assert len(model.layers) == 3  # stage 4 is not needed and was pruned
    pyramid = backbone(torch.randn(1, 3, 64, 80))
    assert [tuple(m.shape[2:]) for m in pyramid.values()] == [(8, 10), (4, 5), (2, 3)]


def test_bad_backbone_arguments_say_what_to_do():
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        boat_fpn_backbone(timm.create_model('boat_swin_tiny_224', **SMALL['boat_swin_tiny_224']))
    with pytest.raises(ValueError, match='BOAT model'):
        boat_fpn_backbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='pass out_indices= to it'):
        boat_fpn_backbone('boat_swin_tiny_224', features_only=True)
    with pytest.raises(ValueError, match=r'out_indices must be increasing stage indices in 0\.\.3'):
        boat_fpn_backbone('boat_swin_tiny_224', out_indices=(2, 4), **SMALL['boat_swin_tiny_224'])
    with pytest.raises(ValueError, match='out_channels must be a positive int'):
        boat_fpn_backbone('boat_swin_tiny_224', out_channels=0, **SMALL['boat_swin_tiny_224'])
    with pytest.raises(ValueError, match='only apply when model is a name'):
        boat_fpn_backbone(
            timm.create_model('boat_swin_tiny_224', dynamic_img_size=True, **SMALL['boat_swin_tiny_224']), embed_dim=32
        )


def _train_then_eval(detector, images, targets):
    detector.train()
    losses = detector(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in detector.backbone.body.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    detector.eval()
    with torch.no_grad():
        return detector(images)


@pytest.mark.parametrize('name, detector_cls', [('boat_swin_tiny_224', FasterRCNN), ('boat_cswin_tiny_224', MaskRCNN)])
def test_rcnn_trains_and_evaluates_on_two_sizes(name, detector_cls):
    images, targets = _images_and_targets()
    if detector_cls is FasterRCNN:
        targets = [{k: v for k, v in t.items() if k != 'masks'} for t in targets]
    backbone = boat_fpn_backbone(name, out_channels=32, **SMALL[name])
    detections = _train_then_eval(detector_cls(backbone, num_classes=3, **SMALL_DETECTOR), images, targets)
    assert len(detections) == 2
    for image, det in zip(images, detections):
        assert det['boxes'].shape[1] == 4 and len(det['boxes']) == len(det['scores']) == len(det['labels'])
        if detector_cls is MaskRCNN:
            assert det['masks'].shape[1:] == (1, *image.shape[1:])


def test_retinanet_trains_and_evaluates():
    images, targets = _images_and_targets()
    targets = [{k: v for k, v in t.items() if k != 'masks'} for t in targets]
    backbone = boat_fpn_backbone(
        'boat_swin_tiny_224',
        out_indices=(1, 2, 3),
        out_channels=32,
        extra_blocks=LastLevelP6P7(32, 32),
        **SMALL['boat_swin_tiny_224'],
    )
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128, 256)), ((0.5, 1.0, 2.0),) * 5)
    detector = RetinaNet(
        backbone,
        num_classes=3,
        anchor_generator=anchors,
        min_size=96,
        max_size=160,
        size_divisible=1,
        detections_per_img=10,
        topk_candidates=50,
    )
    detections = _train_then_eval(detector, images, targets)
    assert len(detections) == 2 and all(d['boxes'].shape[1] == 4 for d in detections)


def test_mmpretrain_timm_backbone_gives_the_stated_maps():
    # mmdetection / mmsegmentation configs reach timm models through mmpretrain's TIMMBackbone; mmdet and mmseg
    # themselves need mmcv's compiled ops, which do not build here (docs/BACKBONES.md)
    registry = pytest.importorskip('mmpretrain.registry', reason='the test extra installs mmpretrain and mmcv-lite')
    backbone = registry.MODELS.build(
        dict(
            type='TIMMBackbone',
            model_name='boat_swin_tiny_224',
            features_only=True,
            pretrained=False,
            out_indices=(0, 1, 2, 3),
            dynamic_img_size=True,
            **SMALL['boat_swin_tiny_224'],
        )
    )
    x = torch.randn(1, 3, 100, 150)
    maps = backbone(x)
    info = backbone.timm_model.feature_info
    assert info.reduction() == [4, 8, 16, 32]
    for m, c, h, w in zip(
        maps, info.channels(), _stage_sizes('boat_swin_tiny_224', 100), _stage_sizes('boat_swin_tiny_224', 150)
    ):
        assert m.shape == (1, c, h, w)
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in backbone.parameters())
