"""Hydra callback that registers the plugin before NeMo builds anything.

NeMo's unmodified example scripts never import ``nemo_layerfx``; Hydra instantiates ``hydra.callbacks`` itself
(outside NeMo's allow-list) and fires ``on_job_start`` before the script body, so a config carrying::

    hydra:
      callbacks:
        layerfx:
          _target_: nemo_layerfx.hydra_hooks.RegisterLayerFX

works with ``speech_to_text_ctc_bpe.py --config-path <our conf> --config-name conformer_gn``.
"""

from typing import Any

from hydra.experimental.callback import Callback


class RegisterLayerFX(Callback):
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._register()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._register()

    @staticmethod
    def _register() -> None:
        from nemo_layerfx.registration import register

        register()
