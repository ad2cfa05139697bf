"""Federated training between hospitals on NVIDIA FLARE: the bundle trained where the data lives.

- :mod:`pneumoseg.federated.values`: what the server may provision (numbers), what a site keeps to itself (its
  manifest, data root, work folder) and the closed list of metrics a site sends.
- :mod:`pneumoseg.federated.job`: the NVFlare job (configuration only, no custom code).
- :mod:`pneumoseg.federated.executor`: the one class a site builds, launching the installed trainer.
- :mod:`pneumoseg.federated.client`: the trainer (FLARE Client API + MONAI's ``MonaiAlgo`` over the installed
  bundle's ``train.json`` / ``evaluate.json``).
- :mod:`pneumoseg.federated.server`: FedAvg with a final evaluation round; the round record.
- :mod:`pneumoseg.federated.report`: per-round, per-site table and plot.
- :mod:`pneumoseg.federated.export`: the global model as a bundle and a sharing archive.
- :mod:`pneumoseg.federated.sites`, :mod:`pneumoseg.federated.simulate`: synthetic hospitals and FLARE's
  simulator.
- :mod:`pneumoseg.federated.cli`: ``pneumoseg federated job | simulate | report``.

Requires the ``federated`` extra (``pip install pneumoseg[federated]``, nvflare pinned). See
``docs/federated.md``.
"""
