"""The FCN generator g of the thesis: encoder -> attention -> 1x1 classifier -> upsample -> softmax.

Channel 0 of the output is background (the thesis' channel K+1); 1..K are the classes, so
an argmax is directly a label map.
"""
import dataclasses

import flax.linen as nn
import jax

from coseg_jax.backbones import weights
from coseg_jax.multiclass.attention import AttentionModule
from coseg_jax.multiclass.attention import AttentionSpec
from coseg_jax.multiclass.baseline import select_taps

# The encoder feature of each encoder ('auto' where the extractor is another network; with
# the same one the pipeline uses the group's cluster taps): VGG16's conv5_3 (stride 16) as
# in the thesis' FCN; for EfficientNet-Lite0 the clustering baseline's default multi-scale
# feature (`baseline.multiscale` of stride 16 and 32; BUILD.md).
ENCODER_TAPS = {'vgg16': 'conv5_3', 'efficientnet_lite0': 'stride16+stride32'}


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
  num_classes: int                 # K foreground classes; the output has K + 1 channels
  preprocessing: str               # matches the encoder's weight source ('caffe' | 'imagenet')
  tap: str                         # encoder feature the attention module works on
  attention: AttentionSpec = AttentionSpec()


class Generator(nn.Module):
  spec: GeneratorSpec
  encoder: nn.Module               # a backbones.* module; its params live under 'encoder'

  def features(self, x01_BxHxWx3):
    """The encoder feature the attention module and classifier work on; a tap 'a+b'
    combines several (each unit per pixel, resized to the finest grid, concatenated)."""
    return select_taps(self.encoder(weights.preprocess(x01_BxHxWx3, self.spec.preprocessing)),
                       self.spec.tap)

  @nn.compact
  def head(self, feat_BxhxwxC, out_hw):
    """Attention, classifier, upsampling to `out_hw` and softmax on encoder features: the
    part that trains when the encoder is frozen (its features are then computed once)."""
    b = feat_BxhxwxC.shape[0]
    k1 = self.spec.num_classes + 1
    feat_BxhxwxC = AttentionModule(self.spec.attention, name='attention')(feat_BxhxwxC)
    logits_Bxhxwx1K = nn.Conv(k1, (1, 1), name='classifier')(feat_BxhxwxC)
    logits_BxHxWx1K = jax.image.resize(logits_Bxhxwx1K, (b, *out_hw, k1), method='bilinear')
    return jax.nn.softmax(logits_BxHxWx1K, axis=-1)

  def __call__(self, x01_BxHxWx3):
    return self.head(self.features(x01_BxHxWx3), x01_BxHxWx3.shape[1:3])
