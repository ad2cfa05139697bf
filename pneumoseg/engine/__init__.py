"""What the bundle's Ignite engines need around :class:`~pneumoseg.networks.SCSEUNet`, one concept a module.

=================  ===========================================================================================
``adapters``       the dual output through MONAI's engines: batch preparation, loss adapter, output handler
``inferers``       CPU autocast; CT volumes slice by slice with the image-level head
``handlers``       gradient clipping, early stopping that survives a resume, stop after an epoch, metric logs
``checkpoints``    best model and last checkpoint, written atomically; resume
``averaging``      the top-k validation checkpoints of a run kept and averaged (``average_top_k.json``)
``seeding``        seeds and kernel choice per run, re-seeding per epoch (exact resume)
``record``         the model record: written when training starts, checked and tuned by evaluation
``datalist``       pre-flight check of a manifest split, naming every bad entry
``distributed``    rank 0 alone writes
``flags``          boolean config values as the command line delivers them
=================  ===========================================================================================

The bundle configs (``bundles/pneumothorax_scse_unet/configs``) name these by module, e.g.
``pneumoseg.engine.checkpoints.BestModelSaver``. Metrics are MONAI's (:mod:`pneumoseg.metrics`), the
post-processing rule and its search :mod:`pneumoseg.postprocessing`; inference on folders is
:mod:`pneumoseg.infer`, which uses :mod:`pneumoseg.engine.inferers` alone.
"""
