"""fervit models, created by name through one registry."""

from fervit.models import hybrid, timm_backbone, vgg_vit, vit  # noqa: F401  (register timm, vit_patch, vit_cnn, vit_resnet,
#                                                               vit_vgg)
from fervit.models.registry import (build_model, count_parameters, create_model, model_label, model_names,
                                    register_model)
from fervit.models.hybrid import ResNetViTEmotion
from fervit.models.vgg_vit import VGGViTEmotion
from fervit.models.vit import VisionTransformerEmotion, VisionTransformerEmotionCNN

__all__ = ["build_model", "count_parameters", "create_model", "model_label", "model_names", "register_model",
           "ResNetViTEmotion", "VGGViTEmotion", "VisionTransformerEmotion", "VisionTransformerEmotionCNN"]
