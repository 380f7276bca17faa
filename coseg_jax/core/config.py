"""Shared config defaults; files under configs/ override a few fields.

Every field is overridable from the command line as `--config.section.field=value`.
Optional paths use `placeholder(str)` (None until set) because a plain None default
cannot be overridden from a flag; sequences are tuples for the same reason.
"""
import functools

from ml_collections import config_dict

from coseg_jax.core import errors

placeholder = config_dict.placeholder


def _weights():
  w = config_dict.ConfigDict()
  # Folder searched for published weight files (Keras notop .h5, torchvision .pth,
  # EfficientNet-Lite0 .pth); falls back to $COSEG_WEIGHTS_DIR.
  w.dir = placeholder(str)
  # Explicit files; each wins over `dir`.
  w.vgg16 = placeholder(str)
  w.resnet50 = placeholder(str)
  w.efficientnet_lite0 = placeholder(str)
  # Where converted Flax arrays are cached; falls back to $COSEG_CACHE_DIR, then
  # ~/.cache/coseg_jax.
  w.cache_dir = placeholder(str)
  return w


def _data(image_size, batch_size):
  d = config_dict.ConfigDict()
  # A group folder (images/, masks/ or instances/), a folder of groups, or a PASCAL
  # VOC root. Unset: the built-in demo data, generated into the work directory.
  d.root = placeholder(str)
  # Only these group names under `root` (empty: all groups).
  d.groups = ()
  # Network input is image_size x image_size (aspect not kept, as in both papers).
  d.image_size = image_size
  # Images per training step; the last batch of an epoch is padded by wrapping around.
  d.batch_size = batch_size
  return d


def _train(learning_rate, head_lr_mult, epochs=0, steps=0):
  t = config_dict.ConfigDict()
  # Training length, exactly one of the two above 0: `epochs` passes over the group, or
  # `steps` optimizer updates whatever the group's size (the other 0).
  t.epochs = epochs
  t.steps = steps
  # The rate of the ImageNet-initialised backbone (encoder).
  t.learning_rate = learning_rate
  # Coupled L2 (added to the gradient before Adam), as in PyTorch's Adam.
  t.weight_decay = 5e-4
  # Learning-rate multiplier for the layers trained from scratch (attention, classifier,
  # saliency head) relative to the ImageNet-initialised backbone.
  t.head_lr_mult = head_lr_mult
  # Learning-rate schedule over the training length: 'constant' or 'cosine' (a half
  # cosine from the rates above towards 0 at the last step, `train.lr_scale`). Constant
  # in both methods: on the multi-class dev groups cosine gained 4.1 J on 24 Penn-Fudan
  # photos as one class and lost 1.0-3.6 J on the other one-class groups and on two MSRC
  # groups (BUILD.md, session 14); DeepCO3 on fudanped24 moved by < 0.05 either way.
  t.schedule = 'constant'
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-8
  # Save a checkpoint every this many steps (and at the end); resume from the latest.
  t.checkpoint_every = 50
  t.max_checkpoints = 2
  # A rerun into a work directory whose fingerprint.json records other settings or
  # inputs: 'stop' (one line naming the differences) or 'fresh' (start over in a new
  # subfolder <workdir>/rerun-<n>; the earlier run is left as it was).
  t.on_mismatch = 'stop'
  return t


def _crf():
  """Dense CRF (core/crf.py) of the multi-class label maps and of DeepCO3's saliency
  foreground; measured on the multi-class dev groups (BUILD.md, real photographs)."""
  c = config_dict.ConfigDict()
  c.iterations = 5
  # Gaussian (smoothness) kernel: spatial std in pixels and weight.
  c.gaussian_sxy = 3.0
  c.gaussian_compat = 3.0
  # Bilateral (appearance) kernel: spatial std, colour std, weight. The generator's maps
  # are stride-16 blobs, so the CRF draws the outlines: at a spatial std of 100-150 px
  # (about a third of a 320 px photo) same-coloured pixels of one object share a label
  # across it (+1.0 J over 50 on the five dev groups, flat from 100 to 150, baseline +0.3;
  # BUILD.md, real photographs). More weight instead (bilateral_compat 40) smoothed the
  # cars of car/road/building away.
  c.bilateral_sxy = 100.0
  c.bilateral_srgb = 13.0
  c.bilateral_compat = 10.0
  # The two spatial stds are pixels of a photo of this many pixels (MSRC v2's 320 x 213,
  # where they were measured) and scale with the photo's side, sqrt(H W / reference_area):
  # the maps are blobs of the network's grid, a fixed fraction of any photo, so the CRF
  # should reach as far in the photo whatever its resolution (horse30 upsampled 2x: J 77.5
  # at fixed pixels, 81.5 scaled, 82.8 at 1x; BUILD.md). 0: literal pixels.
  c.reference_area = 320.0 * 213
  # Unary = -log(clip(S~)); S~ is first raised to this power to sharpen or soften it.
  c.unary_power = 1.0
  return c


# The saliency foreground's CRF unary keeps the prior in [floor, 1 - floor]
# (`saliency.foreground` says why a floor): fudanped24 baseline mAP^r@0.5 0.321 at 1e-4,
# 0.362 at 1e-3, 0.352 at 1e-2, 0.257 at 0.1; fudanped 0.293 at 1e-3, 0.324 at 1e-2.
_SALIENCY_CRF_FLOOR = 0.01

SCHEDULES = ('constant', 'cosine')  # train.schedule (core/train.lr_scale)


def _output():
  o = config_dict.ConfigDict()
  # Write label PNGs, colour overlays and one contact sheet per group.
  o.images = True
  # No progress bars (for sweeps); the log file still gets everything.
  o.quiet = False
  return o


def _distributed():
  d = config_dict.ConfigDict()
  # Multi-process (multi-host) data parallelism via jax.distributed.initialize: set the
  # coordinator's host:port on every process. Unset num_processes / process_id are
  # read from the cluster environment (SLURM, Cloud TPU) by JAX.
  d.coordinator_address = placeholder(str)
  d.num_processes = placeholder(int)
  d.process_id = placeholder(int)
  return d


# The smallest input: the backbones downsample 32x.
MIN_IMAGE_SIZE = 32


def check_shared(config):
  """The fields every method reads; each method's `check_config` adds its own. Every
  numeric field's range is checked before anything is built or written."""
  r = functools.partial(errors.check_range, config)
  r('seed', 0, integer=True)
  r('data.image_size', MIN_IMAGE_SIZE, integer=True)
  r('data.batch_size', 1, integer=True)
  r('train.epochs', 0, integer=True)
  r('train.steps', 0, integer=True)
  epochs, steps = config.train.epochs, config.train.steps
  if not epochs and not steps:
    raise errors.InputError('config.train.epochs: must be at least 1 when config.train.steps '
                            'is 0, got 0')
  if epochs and steps:
    raise errors.InputError(f'config.train.steps: {steps} and config.train.epochs {epochs} are '
                            'both set; set one to 0 (epochs: passes over the group, steps: '
                            'optimizer updates)')
  r('train.learning_rate', 0, above=True)
  r('train.weight_decay', 0)
  r('train.head_lr_mult', 0, above=True)
  r('train.b1', 0, 1, below=True)
  r('train.b2', 0, 1, below=True)
  r('train.eps', 0, above=True)
  r('train.checkpoint_every', 1, integer=True)
  r('train.max_checkpoints', 1, integer=True)
  errors.check_one_of('train.on_mismatch', config.train.on_mismatch, ('stop', 'fresh'))
  errors.check_one_of('train.schedule', config.train.schedule, SCHEDULES)


def multiclass():
  """Defaults of the thesis method (SPEC §3); configs/*.py override a few fields."""
  c = config_dict.ConfigDict()
  c.method = 'multiclass'
  c.seed = 0
  # 'none': train the co-attention model. 'cluster': the training-free baseline of
  # SPEC §6(a) (k-means of the frozen extractor's dense features), scored the same way.
  # 'center': a centred ellipse over 40% of each image labelled class 1 (no training, no
  # features): the reference any co-segmentation should beat. 'saliency' (one class):
  # class 1 where the group's co-saliency prior (DDT x MBD, core/saliency.py) is above
  # its mean, that split redrawn by the dense CRF `infer.crf` (`saliency.foreground`, as
  # DeepCO3's baseline; with infer.method='argmax' the split as it is).
  c.baseline = 'none'
  # Number of foreground classes K shared by the group. Unset: each group's classes.txt
  # (one name a line, or '<id> <name>' lines), so one run can score groups of different K;
  # a group without one gets K estimated (multiclass/num_classes.py).
  c.num_classes = placeholder(int)
  # Largest K the estimate considers (it clusters up to max_classes + 2 labels).
  c.max_classes = 5
  c.data = _data(image_size=384, batch_size=3)
  c.weights = _weights()

  c.model = config_dict.ConfigDict()
  # Generator encoder: 'auto' (vgg16 if its weights are found, else efficientnet_lite0),
  # 'vgg16' (the thesis), or 'efficientnet_lite0'.
  c.model.encoder = 'auto'
  # Frozen extractor f: 'auto' (resnet50 if found, else efficientnet_lite0), 'resnet50'
  # (the thesis) or 'efficientnet_lite0'.
  c.model.extractor = 'auto'
  # Encoder feature the attention and classifier work on: 'auto' (the group's
  # cluster_taps where the encoder is the extractor's network, so the 'cluster' init starts
  # as the baseline; else conv5_3 for vgg16, stride16+stride32 for efficientnet_lite0) or
  # any tap of the encoder ('head', stride16).
  c.model.encoder_tap = 'auto'
  # Dense features the k-means partitions (the clustering baseline, the 'cluster' init),
  # from the extractor; 'a+b' combines taps (each unit per pixel, resized to the finest
  # grid). 'auto': per group, of stride16+stride32 and stride8+stride16+stride32 for
  # efficientnet_lite0 the one whose partition has the lower co-attention loss (the K
  # estimate's criterion; metrics.json's cluster_taps_chosen); layer3+layer4 for resnet50
  # (BUILD.md, real photographs). The K estimate and unpartitioned groups use the first.
  c.model.cluster_taps = 'auto'
  # Input normalisation of EfficientNet-Lite0 (encoder and extractor): 'tflite'
  # ((x - 127) / 128 on 0..255, what the TF-Lite checkpoints were trained with) or
  # 'imagenet' (mean/std).
  c.model.lite0_input = 'tflite'
  # 1x1 classifier initialisation: 'random' (lecun normal), 'cluster' (k-means
  # centroids of the group's encoder features, the background rule's cluster as channel
  # 0), 'saliency' (one class only: the centroids of the encoder features above and below
  # the group's co-saliency prior's mean; on street photos 2-means splits road from
  # facades and never finds the pedestrians), or 'auto': 'saliency' for one class, else
  # 'cluster' (BUILD.md, real photographs).
  c.model.classifier_init = 'auto'
  # Sharpness of the 'cluster' init: logits = T <f, c_k> / mean|f|. At 40 the step-0 maps
  # are the k-means labels with confident unaries, so the CRF keeps them (at 10 the soft
  # unaries lost 17 J to the CRF on car/road/building; BUILD.md).
  c.model.cluster_init_temperature = 40.0
  # Attention on the deepest encoder map: 'none' | 'sa' | 'ma' | 'sa_ma' (Tables 3-4).
  c.model.attention = 'sa_ma'
  # Mutual attention squashes column sums v of the row-softmax with sigmoid(v * M**-p);
  # the thesis' constant was lost in extraction. p=0.5 makes a pixel that every
  # reference pixel picks (v = M) saturate and the average pixel (v = 1) sit near 0.5.
  c.model.mutual_scale_power = 0.5
  # Q/K/V channels are C // attention_reduction (C' = C/2 in the thesis).
  c.model.attention_reduction = 2

  c.loss = config_dict.ConfigDict()
  # Pooling of f's dense features of each masked image: 'masked' (weighted by the mask;
  # avoids the trivial optimum of empty masks, BUILD.md) or 'global' (plain GAP, thesis).
  c.loss.pooling = 'masked'
  # Mask the images with Eq. 8-normalised maps S / max S, the maps inference labels, so
  # a faint everywhere channel is not a black image (another trivial optimum, BUILD.md).
  c.loss.normalize_maps = True
  # Normalisation of f's pooled vectors before the distances: 'l2' or 'none'. Raw
  # 2048-d features make d+ - d- huge and saturate the softplus.
  c.loss.feature_norm = 'l2'
  # Multiplies the normalised features (distances scale by its square).
  c.loss.feature_scale = 2.0
  # Weight of the coverage term (losses.coverage_loss: each pixel's channels against its
  # nearest class of the other images, on the cluster_taps features); 0 = the thesis' loss.
  c.loss.coverage_weight = 0.0

  # The encoder stays at its ImageNet weights and the attention and classifier learn at
  # 1e-3 for 50 steps (BUILD.md, real photographs): fine-tuned, the encoder's features moved
  # to satisfy the loss and undid the k-means init; at 1e-3 a class channel of
  # tree/sky/grass collapsed after ~60 steps. Steps, not epochs, so the length that stops
  # short of it does not grow with the group. The thesis' lr exponent was lost; the
  # fine-tuned schedule before session 6: --config.train.freeze_encoder=False
  # --config.train.learning_rate=1e-4 --config.train.head_lr_mult=10
  # --config.train.steps=0 --config.train.epochs=10.
  c.train = _train(steps=50, learning_rate=1e-6, head_lr_mult=1000.0)
  # True: the encoder is not trained and its features are computed once per group, so a
  # step runs only attention, classifier and f. False: it is fine-tuned at learning_rate
  # (the thesis).
  c.train.freeze_encoder = True

  c.infer = config_dict.ConfigDict()
  # 'crf' (dense CRF, Tables 6-7) or 'argmax' (Eq. 9), both after Eq. 8 normalisation.
  c.infer.method = 'crf'
  # Which label is background (BUILD.md, real photographs): 'consistency' (the label whose
  # masked images, through f with the loss' pooling, agree least across the group: the
  # criterion the loss encodes), 'saliency' (the label of lowest mean co-saliency prior:
  # with one class the common stuff, a road in every street photo, is as consistent as
  # the common object), 'saliency+consistency' (the lowest sum of the two: a class either
  # stands out, an object, or recurs, stuff; a varied class such as buildings is kept by
  # its saliency, a stuff class by its consistency), 'border' (the label owning most
  # image-border pixels; fails when stuff classes fill the border), 'channel' (the
  # generator's channel 0 as trained, the thesis), or 'auto'. A rule other than 'channel'
  # orders the k-means classifier init, labels the clustering baseline and names the
  # method's background again after training; 'auto' and 'channel' order the init and
  # label the baseline by 'saliency' for one class, else 'saliency+consistency', and the
  # method keeps the channel its init named ('auto' re-runs that rule on the trained
  # labels only after a random init, which names no channel).
  c.infer.background = 'auto'
  c.infer.crf = _crf()
  # The 'saliency' baseline's CRF unary floor (`saliency.foreground`).
  c.infer.saliency_floor = _SALIENCY_CRF_FLOOR

  c.output = _output()
  c.distributed = _distributed()
  return c


def instance():
  """Defaults of DeepCO3 (SPEC §4, from the authors' code)."""
  c = config_dict.ConfigDict()
  c.method = 'instance'
  c.seed = 0
  # 'none': DeepCO3. 'saliency': the saliency prior alone, binarised, one instance per
  # connected component (SPEC §6(b)), scored the same way.
  c.baseline = 'none'
  c.data = _data(image_size=448, batch_size=6)
  c.weights = _weights()

  c.model = config_dict.ConfigDict()
  # 'auto' (vgg16 if its weights are found, else efficientnet_lite0), 'vgg16', or
  # 'efficientnet_lite0'. Fine-tuned, unlike the multi-class extractor.
  c.model.backbone = 'auto'
  # Feature tap; 'auto' is conv5_3 for vgg16 (Keras notop has no fc6) and the head
  # for efficientnet_lite0.
  c.model.feature = 'auto'
  # Per-pixel L2 normalisation f / sqrt(sum f^2 + eps).
  c.model.l2_eps = 1e-2

  c.loss = config_dict.ConfigDict()
  c.loss.copeak_weight = 0.5
  c.loss.affinity_weight = 0.1
  c.loss.affinity_alpha = 4.0
  c.loss.saliency_weight = 1.0

  c.saliency = config_dict.ConfigDict()
  # Saliency prior: 'ddt_mbd' (co-saliency: the group's DDT map of the frozen ImageNet
  # backbone's `ddt_tap` descriptors times MBD), 'mbd' (minimum barrier distance on
  # superpixels alone) or 'folder' (precomputed maps: <stem>.png or .mat under `folder`).
  c.saliency.prior = 'ddt_mbd'
  # Backbone tap DDT reads at data.image_size; 'auto': block13 for efficientnet_lite0 (the
  # last 192-d stride-32 stage; the 320-d projection and the 1280-d head are less
  # object-selective), conv5_3 for vgg16, layer4 for resnet50.
  c.saliency.ddt_tap = 'auto'
  c.saliency.folder = placeholder(str)
  # The binary foreground whose connected components are the 'saliency' baseline's
  # instances and the candidates `proposals.prior_components` adds: 'crf' (the split at the
  # prior's mean redrawn by the dense CRF `saliency.crf`, the multi-class method's
  # defaults) or 'none' (prior > its mean). fudanped mAP^r@0.5 of the baseline 0.192 ->
  # 0.324, fudanped24 0.326 -> 0.352 (BUILD.md, "Real photographs (DeepCO3)").
  c.saliency.refine = 'crf'
  # How the foreground's components become instances (`baseline.SPLITS`): 'aspect' cuts a
  # component n times wider for its height than the group's median one into n side by side
  # (people walking together merge into one component); 'none' keeps them whole (SPEC
  # §6(b)). Baseline mAP^r@0.5 fudanped 0.324 -> 0.544, fudanped24 0.352 -> 0.567 (BUILD.md).
  c.saliency.split = 'aspect'
  c.saliency.crf = _crf()
  c.saliency.crf_floor = _SALIENCY_CRF_FLOOR

  # For EfficientNet-Lite0 on real photographs (BUILD.md, "Real photographs (DeepCO3)"): the
  # fine-tuned backbone at 1e-5, the zero-initialised saliency head at 1e-3 (with the whole
  # network at 1e-3 the saliency loss did not move); 40 steps, counted in steps because the
  # saliency loss is lowest after ~40 whatever the group's size and then rises while the
  # co-peak loss reshapes the backbone (130 steps, 10 epochs of fudanped, found 6x the
  # peaks). The paper's 40 epochs at lr 1e-6, head_lr_mult 1 suit VGG16 fed 0-255 pixels.
  c.train = _train(steps=40, learning_rate=1e-5, head_lr_mult=100.0)

  c.proposals = config_dict.ConfigDict()
  # Eq. 7's own candidates: 'builtin' (hierarchical superpixel grouping), 'folder' (.mat /
  # HDF5 per image, e.g. MCG, the authors') or 'none' (only `prior_components`). 'none':
  # the grouping's regions of a person and the ground around it win Eq. 7 over the person
  # (masks 2-3x a pedestrian's area), so the peaks choose better among the baseline's
  # instances alone: mAP^r@0.5 fudanped 0.200 -> 0.429, CorLoc^r 0.554 -> 0.770, fudanped24
  # 0.210 -> 0.467, and fudanped in 4.7 min instead of 12.5 (BUILD.md, session 16).
  c.proposals.source = 'none'
  c.proposals.folder = placeholder(str)
  c.proposals.min_area = 2e-5
  c.proposals.max_area = 0.85
  # Also offer the saliency baseline's instances (`saliency.refine`, `saliency.split`) to
  # the ranking: with the built-in proposals, on fudanped24, the chosen mask then follows
  # the person more often (mAP^r@0.5 0.111 -> 0.178 with the raw split, 0.225 with the
  # CRF's; BUILD.md, real photographs). False: proposals only (the authors').
  c.proposals.prior_components = True

  c.rank = config_dict.ConfigDict()
  c.rank.inside_weight = 0.8
  c.rank.background_penalty = 1e-5
  c.rank.nms_iou = 0.4
  # Width of the contour band (dilation != erosion) of the contour-preserving term.
  c.rank.contour_width = 5
  # Eq. 7 with each peak response map scaled to unit sum and background_penalty counted per
  # pixel of an image of this many pixels (448^2, the paper's input size); 0 = literal
  # Eq. 7 on this image's pixels with the maps as back-propagated
  # (`proposals.rank_proposals` says why).
  c.rank.reference_area = 448 * 448
  # What becomes a detection: 'peaks' (each instance peak's best candidate under Eq. 7, the
  # paper), 'candidates' (every candidate, scored by Eq. 7 of its best peak) or 'auto':
  # 'candidates' when the candidates are the baseline's few instances alone
  # (proposals.source='none'), where 'peaks' drops the people no peak chose (mAP^r@0.5
  # fudanped 0.429 -> 0.482, fudanped24 0.467 -> 0.506; BUILD.md, session 18), else 'peaks'
  # (~900 proposals per image would all become detections).
  c.rank.detections = 'auto'
  # Detections below this percentile of the group's scores are dropped (best per image kept).
  c.rank.drop_percentile = 20.0
  # Instance peaks must also be salient: pre-sigmoid score > this (0: S~ > 0.5). The
  # authors keep every local maximum >= the median (-inf here), ~25-40 per 14x14 map on
  # real photos, each one a PRM back-propagation and a detection before NMS.
  c.rank.peak_min_score = 0.0

  c.output = _output()
  c.distributed = _distributed()
  return c
