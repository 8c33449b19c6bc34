"""``agcnn train``: one loop driven by the stage table (paper Sec. 3.5 and 4.2).

    agcnn train --config configs/agcnn_r50.yaml --out RUN_DIR

AG-CNN is trained in three stages (Sec. 3.5):

I.   the global branch on the whole image;
II.  the local branch on the attended crops, the global branch fixed (it produces the heatmap);
III. the fusion head on the concatenated pool5 features, both branches fixed -- or, with
     ``train.finetune_all``, everything fine-tuned together (Table II, "G L F*").

Each stage is one row of :data:`agcnn.stages.STAGE_TABLE`: which modules train, which are
frozen, which logits are scored, which earlier stage's ``best.pt`` seeds it, and which cache of
its frozen branches' outputs it may train on. The loop itself is the same for every row.
Freezing is explicit -- ``requires_grad_(False)`` and ``.eval()`` so frozen batch-norm
statistics do not drift -- never a tiny learning rate. A stage whose seed checkpoint is missing
stops with an error that names the file and the stage to run first.

Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on the CPU, nccl on
CUDA); ``batch_size`` is the total over all processes; only rank 0 writes files (the run
layout: :mod:`~agcnn.train.outputs`).

The package, one module per part (each imports only the ones listed before it):

* :mod:`~agcnn.train.context` -- :class:`TrainContext`, what every stage of a run shares;
* :mod:`~agcnn.train.step` -- :func:`train_step`, the one optimizer step (the benchmarks time
  it), and the optimiser and its schedule;
* :mod:`~agcnn.train.seeds` -- random seeds and state; where a stage starts (seed checkpoint,
  resume);
* :mod:`~agcnn.train.loaders` -- training and evaluation loaders, a batch on its way to the model;
* :mod:`~agcnn.train.parallel` -- DDP, synchronised batch norm, gathering the processes' shares;
* :mod:`~agcnn.train.sources` -- the :class:`BatchSource` protocol: images, cached fusion
  features, cached local crops;
* :mod:`~agcnn.train.stage` -- :func:`build_stage`: one stage's model, optimizer and source;
* :mod:`~agcnn.train.outputs` -- config.yaml, checkpoints, log.csv, TensorBoard;
* :mod:`~agcnn.train.loop` -- :func:`train` and the epoch loop;
* :mod:`~agcnn.train.command` -- ``agcnn train`` arguments.
"""
