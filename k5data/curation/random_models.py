"""Random-weight model folders of the curation backends' classes, written with ``save_pretrained`` so they load
through the same ``from_pretrained`` path as the real checkpoints: ``tiny`` for tests (a few thousand parameters,
thresholds calibrated on their outputs) and ``production`` for throughput benchmarks (the architecture and size of
the models named in ``configs/curation-production.yaml``; the weights are random, so only the speed means anything).
Nothing is downloaded: every config is built in code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SIZES = ("tiny", "production")
# why: at the usual 0.02 a tiny random head outputs near-uniform probabilities (differences ~1e-6 between images);
# wider weights make its scores differ visibly, so thresholds calibrated on them are not at float-noise level
TINY_INIT = 0.5


def _save(model: Any, processor: Any, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _labels(names: list[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def image_classifier(out: str | os.PathLike, labels: list[str], size: str = "tiny", seed: int = 0) -> Path:
    """ViT image classifier (production: ViT-B/16 at 224, 86 M parameters, the size of the report's
    watermark_resnext101_32x8d and of TOPIQ's ResNet-50 + attention head)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    dims = (dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, initializer_range=TINY_INIT) if size == "tiny"
            else dict(image_size=224, patch_size=16))
    model = ViTForImageClassification(ViTConfig(**dims, **_labels(labels)))
    side = dims["image_size"]
    return _save(model, ViTImageProcessor(size={"height": side, "width": side}), out)


def object_detector(out: str | os.PathLike, labels: list[str], size: str = "tiny", seed: int = 0) -> Path:
    """Detector: tiny YOLOS (ViT detector, 'You Only Look at One Sequence') for tests; production: RT-DETR-R50
    (the real-time YOLO-class DETR, 42 M parameters) at 640."""
    import torch

    torch.manual_seed(seed)
    if size == "tiny":
        from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

        cfg = YolosConfig(image_size=[64, 64], patch_size=16, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, num_detection_tokens=10,
                          initializer_range=TINY_INIT, **_labels(labels))
        proc = YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
        return _save(YolosForObjectDetection(cfg), proc, out)
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor

    return _save(RTDetrForObjectDetection(RTDetrConfig(**_labels(labels))),
                 RTDetrImageProcessor(size={"height": 640, "width": 640}), out)


def video_regressor(out: str | os.PathLike, outputs: list[str], size: str = "tiny", seed: int = 0) -> Path:
    """VideoMAE with a regression head named by ``outputs`` (production: VideoMAE-B, 16 frames at 224; the report's
    dynamics model is a VideoMAE, DOVER's backbone is of the same class and size)."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

    torch.manual_seed(seed)
    dims = (dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=16, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=32, initializer_range=TINY_INIT) if size == "tiny" else {})
    cfg = VideoMAEConfig(**dims, problem_type="regression", **_labels(outputs))
    side = cfg.image_size
    proc = VideoMAEImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return _save(VideoMAEForVideoClassification(cfg), proc, out)


def clip(out: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """CLIP with its tokenizer (production: ViT-L/14 at 224, 428 M parameters; the tokenizer is the small BPE of
    ``k5model.tiny`` in both sizes, so the text side's cost is not the real one: it runs once per label set)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from k5model.tiny import _clip_tokenizer

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    text = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, max_position_embeddings=77)
    if size == "tiny":
        text.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2)
        proj = 16
    else:
        text.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16)
        proj = 768
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj))
    side = vision["image_size"]
    path = _save(model, CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
                 out)
    tok.save_pretrained(path)
    return path


def dinov2(out: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """DINOv2 (production: ViT-B/14 at 224)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    dims = (dict(image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 mlp_ratio=2) if size == "tiny" else dict(image_size=518, patch_size=14))
    side = 28 if size == "tiny" else 224
    proc = BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return _save(Dinov2Model(Dinov2Config(**dims)), proc, out)


def sam2(out: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """SAM 2 (production: sam2.1-hiera-large at 1024, 224 M parameters). The processor file is written by hand:
    transformers' SAM 2 image processor needs torchvision; ``Sam2Counter`` reads mean/std from it."""
    import json

    import torch
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(seed)
    if size == "tiny":
        backbone = dict(model_type="sam2_hiera_det_model", hidden_size=8, image_size=[128, 128],
                        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                        num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
        cfg = Sam2Config(
            vision_config=dict(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32,
                               backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]),
            prompt_encoder_config=dict(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                     iou_head_hidden_dim=32))
    else:
        backbone = dict(model_type="sam2_hiera_det_model", hidden_size=144, blocks_per_stage=[2, 6, 36, 4],
                        embed_dim_per_stage=[144, 288, 576, 1152], num_attention_heads_per_stage=[2, 4, 8, 16],
                        window_size_per_stage=[8, 4, 16, 8], global_attention_blocks=[23, 33, 43])
        cfg = Sam2Config(vision_config=dict(backbone_config=backbone, backbone_channel_list=[1152, 576, 288, 144]))
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    Sam2Model(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Sam2ImageProcessor", "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return path


def qwen_vl(out: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Qwen2.5-VL (captions, domains, Q-Align-style quality). Only ``tiny`` is built here (k5model.tiny's); the
    production 7B is benchmarked on a GPU from its own folder."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from k5model.tiny import _qwen_model, _qwen_tokenizer

    if size != "tiny":
        raise ValueError("qwen_vl: only the tiny random model is built in code; point the benchmark at a local "
                         "Qwen2.5-VL folder for production size")
    torch.manual_seed(seed)
    path = Path(out)
    tok = _qwen_tokenizer()
    tok.save_pretrained(path)
    _qwen_model(tok).save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(path)
    return path
