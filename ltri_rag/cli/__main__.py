"""``python -m ltri_rag.cli``: the ``ltri-rag`` command."""

import sys

from ltri_rag.cli.app import main

sys.exit(main())
