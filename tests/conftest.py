import os
import sys

# Tests import the shared toy models as `models`; nothing downloads.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
