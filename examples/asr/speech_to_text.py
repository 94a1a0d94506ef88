"""Train a NeMo ASR model from a Hydra config; the model class (CTC / RNNT / hybrid, BPE or char) comes from it.

    python examples/asr/speech_to_text.py --config-name conformer_gn_tiny
    python examples/asr/speech_to_text.py --config-name conformer_gn \
        model.train_ds.manifest_filepath=train.json model.validation_ds.manifest_filepath=dev.json \
        model.tokenizer.dir=tokenizer/

Configs are read from nemo_layerfx's conf/ folder unless --config-path says otherwise.
"""

from nemo_layerfx.train import main

if __name__ == "__main__":
    main()
