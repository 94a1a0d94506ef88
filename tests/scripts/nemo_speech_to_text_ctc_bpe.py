"""The body of NeMo's examples/asr/asr_ctc/speech_to_text_ctc_bpe.py (the pip wheel ships no examples/).

It never imports nemo_layerfx: the plugin must arrive through the config's hydra.callbacks block.
"""

import lightning.pytorch as pl
from omegaconf import OmegaConf

from nemo.collections.asr.models.ctc_bpe_models import EncDecCTCModelBPE
from nemo.core.config import hydra_runner
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from nemo.utils.trainer_utils import resolve_trainer_cfg


@hydra_runner(config_path="../conf/citrinet/", config_name="config_bpe")
def main(cfg):
    logging.info(f'Hydra config: {OmegaConf.to_yaml(cfg)}')
    trainer = pl.Trainer(**resolve_trainer_cfg(cfg.trainer))
    exp_manager(trainer, cfg.get("exp_manager", None))
    asr_model = EncDecCTCModelBPE(cfg=cfg.model, trainer=trainer)
    asr_model.maybe_init_from_pretrained_checkpoint(cfg)
    trainer.fit(asr_model)
    print("ENCODER", type(asr_model.encoder).__name__, "STEPS", trainer.global_step)
    print("LOWRANK", sum(type(m).__name__ == "LowRankLinear" for m in asr_model.modules()))  # test instrumentation
    print("GATES", sum(type(m).__name__ == "RetentionGate" for m in asr_model.modules()))
    print("SHARED", getattr(asr_model.encoder, "share_layers", None), "DEPTHS",
          [d for _, d in next((cb.history for cb in trainer.callbacks if type(cb).__name__ == "DepthSampling"), [])])
    ranks = next((cb.rank_histories for cb in trainer.callbacks if type(cb).__name__ == "DepthSampling"), [])
    print("RANK_DEPTHS", [[d for _, d in h] for h in ranks], flush=True)


if __name__ == '__main__':
    main()
