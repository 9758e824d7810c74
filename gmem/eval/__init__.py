"""Sample quality: standard FID offline, the paper's FID protocol, a pixel-space proxy, classifier accuracy.

- :mod:`gmem.eval.frechet`: :func:`frechet_distance` (float64, equal to pytorch-fid's),
  :func:`gaussian_stats`, and the cheap PROXY :func:`pixel_fid` ("pixFID8": 8x8-pooled pixels, not
  the Inception FID, comparable only with itself).
- :mod:`gmem.eval.inception`: the standard FID network (TF-Inception 2015-12-05, 2048-d pool features)
  with no download, :func:`inception_features`, and the conversion into pytorch-fid's layout.
- :mod:`gmem.eval.protocol`: :func:`inception_fid` and the paper's protocol :func:`protocol_fid`
  (N = min(data size, 10,000) samples, real statistics cached per dataset).
- :mod:`gmem.eval.classifier`: :func:`classifier_accuracy` of class-conditional samples, judged by a
  small CNN trained on the real labelled data (cached).
- :mod:`gmem.eval.diversity`: :func:`near_duplicate_share`, the share of near-duplicate pairs, and
  :func:`nearest_neighbour_ratio`, nearest-neighbour spread against real images (mode collapse).
- :mod:`gmem.eval.cache`: the cache directory (``$GMEM_CACHE_DIR`` or ``~/.cache/gmem``).
"""
from .cache import cache_dir, fingerprint
from .classifier import SmallClassifier, classifier_accuracy, train_classifier
from .diversity import NEAR_DUPLICATE_THRESHOLD, near_duplicate_share, nearest_neighbour_ratio
from .frechet import fid_from_features, frechet_distance, gaussian_stats, pixel_features, pixel_fid
from .inception import (
                        FEATURE_DIM,
                        INCEPTION_FILE,
                        inception_features,
                        inception_weights_path,
                        load_inception,
                        pytorch_fid_inception,
                        pytorch_fid_state_dict,
                        torchscript_inception_path,
)
from .protocol import (
                        PAPER_MAX_SAMPLES,
                        inception_fid,
                        protocol_fid,
                        protocol_sample_count,
                        real_features,
                        real_statistics,
)

__all__ = ["frechet_distance", "gaussian_stats", "fid_from_features", "pixel_features", "pixel_fid", "inception_fid",
           "inception_features", "inception_weights_path", "INCEPTION_FILE", "FEATURE_DIM", "load_inception",
           "torchscript_inception_path", "pytorch_fid_state_dict", "pytorch_fid_inception", "PAPER_MAX_SAMPLES",
           "protocol_sample_count", "real_statistics", "real_features", "protocol_fid", "SmallClassifier",
           "train_classifier", "classifier_accuracy", "cache_dir", "fingerprint", "near_duplicate_share",
           "nearest_neighbour_ratio", "NEAR_DUPLICATE_THRESHOLD"]
