"""``python -m training.study``: the study's command line (:func:`training.study.runner.main`)."""
import sys

from training.study.runner import main

sys.exit(main())
