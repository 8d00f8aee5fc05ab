"""Trainer integrations of :class:`~saddlescope.monitor.SaddleMonitor`, each importing its trainer only
when used: :mod:`.lightning_callback` (PyTorch Lightning) and :mod:`.transformers_callback` (Hugging
Face ``Trainer``). The plain-loop helper is :mod:`saddlescope.monitor.loop`."""
