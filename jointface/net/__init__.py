"""The joint detection + identification network in plain torch.

* :mod:`.resnet` - torchvision-compatible ResNet backbones;
* :mod:`.anchors` - k-means anchor sizes and the anchor grid;
* :mod:`.boxes` - IoU, YOLO box coding, NMS;
* :mod:`.matching` - ground truth -> anchor targets;
* :mod:`.model` - :class:`JointNet`, identity heads, pre/post-processing;
* :mod:`.loss` - named loss terms.
"""

from .anchors import AnchorGrid, kmeans_anchors
from .boxes import BoxCoder, batched_nms, box_iou, nms
from .model import JointNet, JointOutput, ModelRecord, build_identity_heads, postprocess
from .resnet import build_resnet, load_torchvision_weights

__all__ = ["AnchorGrid", "BoxCoder", "JointNet", "JointOutput", "ModelRecord", "batched_nms", "box_iou",
           "build_identity_heads", "build_resnet", "kmeans_anchors", "load_torchvision_weights", "nms", "postprocess"]
