"""ReLabel (Yun et al., CVPR 2021): dense label maps of a classifier teacher, pooled per crop.

Like FKD, ReLabel runs a strong teacher once ahead of time, but it stores a *label map* per
image (the teacher's class scores at every location of its last feature map) and labels a
random crop at training time by pooling that map over the crop's box.

* :mod:`.targets`: the dense scores of the teacher and the pooling (RoIAlign + softmax);
* :mod:`.maps`: the maps in a target store (writing, :class:`LabelMaps`) and :class:`RelabelViews`.

Format, RoIAlign conventions and storage: ``docs/relabel.md``.
"""

from .maps import (LabelMaps, LabelMapStats, RelabelViews, fill_label_maps, label_map_spec, open_label_map_writer,
                   teacher_identity, write_label_maps)
from .targets import box_rois, classifier_weights, dense_from_topk, dense_scores, relabel_targets

__all__ = ["LabelMaps", "LabelMapStats", "RelabelViews", "fill_label_maps", "label_map_spec", "open_label_map_writer",
           "teacher_identity", "write_label_maps", "box_rois", "classifier_weights", "dense_from_topk", "dense_scores",
           "relabel_targets"]
