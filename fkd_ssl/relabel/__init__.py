"""ReLabel (Yun et al., CVPR 2021): dense label maps of a classifier teacher, pooled per crop.

:mod:`.targets` computes and pools the maps, :mod:`.maps` stores and reads them.  Format: ``docs/relabel.md``.
"""

from .maps import (LabelMaps, LabelMapStats, RelabelViews, fill_label_maps, label_map_spec, open_label_map_writer,
                   write_label_maps)
from .targets import box_rois, classifier_weights, dense_from_topk, dense_scores, relabel_targets
