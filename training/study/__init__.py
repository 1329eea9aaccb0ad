"""Rate–distortion study: does RFSQ's conditioning pay off at equal bits, and at equal *real* rate?

    python -m training.study --jobs 2 --commit    # the whole study (short grid, then long runs), then the report
    python -m training.study --length short --seeds 0 1 --jobs 2
    python -m training.study --only fsq22 rfsq2-ln --seeds 0 --folds 0 --steps 200
    python -m training.study --loss-check --commit  # L1 vs the paper's L1 + LPIPS on the main configurations
    python -m training.study --report             # only regenerate training/results/ from the records

**Continuing from a clone.** Each finished run leaves a small record (its results, config, held-out
and per-photo metrics) in ``training/results/records/`` (:mod:`training.study.records`); ``--commit``
commits each record as its run finishes. The runner treats a record as a finished run, so on a fresh
clone the same command continues where the last commit stopped; the report is built from every
record and is never rebuilt from fewer runs than the committed one covers.

Every run is ``training/train.py``'s ``main`` (same code path as any training run) on the offline
photos: the embedded scikit-image set plus the real photographs of :data:`training.data.EXTRA_PHOTOS`
(``--extra-photos``). **Cross-validation by image**: the real photos (:data:`training.study.grid.CV_PHOTOS`,
17 scenes; the stereo pair is one) are dealt into :data:`~training.study.grid.N_FOLDS` folds; a run
trains on every fold but one (``--holdout-photos``: split by image, never by crop) and is evaluated on
the held-out one, so every photo is held out exactly once per seed. Seeds pair across configurations
(same ``--seed`` and photos: the same crops in the same order; the same initialisation of the layers
whose shapes agree). The long runs (:data:`~training.study.grid.MAIN`, 10x longer) use fold 0 only.

Run directories (checkpoints, logs) live in ``ROOT/<steps>steps/fold<f>/<config>-seed<k>/`` (default
ROOT ``runs/study-cv``, git-ignored); a run with a record is skipped, an interrupted one continued
(``--resume auto``), and a lock file per run lets several
processes share the grid: ``--jobs N`` starts N of them (one per free core). ``ROOT/progress.log``
records when each run finished (the measured wall time). After training, :func:`training.evaluate.evaluate_run`
writes the overall held-out metrics and :func:`training.study.photo_eval.evaluate_photos` the per-photo
ones with the real entropy-coded rate. ``--report`` writes the table (paired differences with 95 %
bootstrap intervals, :mod:`training.study.stats`) and the plots to ``training/results/`` from the records.

Scale (chosen for a 2-core machine shared with other jobs; measured, one thread per run):

- 32x32 crops (latent 8x8) of the photos resized to a 64-pixel short side; encoder/decoder width 32
  (paper: 128x128, width 128); batch 16; Adam at the paper's lr 8e-4, 1 % warmup, linear decay.
- **Loss: L1 (+ the quantizer's aux loss) only; LPIPS-VGG is measured in every validation but not
  trained on.** Measured on one idle core, a step (batch 16) takes 0.024 s with L1 and 0.65 s with
  L1 + LPIPS-VGG (its forward+backward is 96 % of the step). ``--lpips-loss-weight 1`` restores the
  paper's loss; ``--loss-check`` measures whether the change matters.
- 1000 steps (16k crops) per short run, 10000 for the long ones; 5 seeds.
"""
