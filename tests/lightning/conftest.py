import sys
from pathlib import Path

# The helper modules of these tests (models.py, ...) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))
