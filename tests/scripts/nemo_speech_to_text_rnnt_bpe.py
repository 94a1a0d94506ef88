"""The body of NeMo's examples/asr/asr_transducer/speech_to_text_rnnt_bpe.py (not in the pip wheel)."""

import lightning.pytorch as pl

from nemo.collections.asr.models import EncDecRNNTBPEModel
from nemo.core.config import hydra_runner
from nemo.utils.exp_manager import exp_manager
from nemo.utils.trainer_utils import resolve_trainer_cfg


@hydra_runner(config_path="experimental/contextnet_rnnt", config_name="config_rnnt_bpe")
def main(cfg):
    trainer = pl.Trainer(**resolve_trainer_cfg(cfg.trainer))
    exp_manager(trainer, cfg.get("exp_manager", None))
    asr_model = EncDecRNNTBPEModel(cfg=cfg.model, trainer=trainer)
    asr_model.maybe_init_from_pretrained_checkpoint(cfg)
    trainer.fit(asr_model)
    print("ENCODER", type(asr_model.encoder).__name__, "STEPS", trainer.global_step)


if __name__ == '__main__':
    main()
