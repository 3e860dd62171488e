"""The LFW protocol splits (P1, P2, P3) live in :mod:`jointface.datasets.protocols`; re-exported here for
the benchmarks."""

from jointface.datasets.protocols import *  # noqa: F401,F403
from jointface.datasets.protocols import (P1_IMAGES_PER_PERSON, P1_MIN_IMAGES, P1_TEST_EVERY,  # noqa: F401
                                          P2_MAX_IMAGES, LabelledImage, default_shared_data, list_lfw,
                                          require_shared_data)
