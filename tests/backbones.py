# Temporary: the tiny backbones moved to flamingo.testing.
from flamingo.testing import *  # noqa: F401,F403
from flamingo.testing import FAMILY_SPECS, TINY_CORPUS  # noqa: F401
