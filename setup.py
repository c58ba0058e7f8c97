from setuptools import find_packages, setup

# The transformers ranges (training vs loading an export) live in engine/compat.py, read here without
# importing the engine (it needs torch).
compat: dict = {"__name__": "engine.compat"}
exec(open("engine/compat.py", encoding="utf-8").read(), compat)

setup(
    name="ftl-engine",
    version="0.1.0",
    description="Distributed fine-tuning engine for GPT-2-family models (DDP and DeepSpeed ZeRO).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    # torch keeps only a lower bound: CPU machines install the local CPU wheel first
    # (pip install torch==2.13.0), GPU machines keep the CUDA build they already have.
    # Training floors (tests/unit/test_gpu_readiness.py): torch 2.6 for get_total_norm/clip_grads_with_norm_;
    # transformers: engine/compat.py's TRANSFORMERS_TRAIN; DeepSpeed 0.19.8 is the one whose bf16
    # fp32-gradient-accumulation support per ZeRO stage was read and tested (backends/ds_config.py).
    install_requires=[
        "torch>=2.6",
        compat["TRANSFORMERS_TRAIN"],  # exports load with compat["TRANSFORMERS_EXPORT"] (a wider range)
        "deepspeed>=0.19.8",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "tensorboard>=2.15",
        "click>=8.1",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "xxhash>=3.0",  # checkpoint digests (engine/integrity.py); datasets needs it too
        "tqdm>=4.66",
        # ftl export --format onnx (torch.onnx's exporter needs onnxscript; the check runs onnxruntime)
        "onnx>=1.16",
        "onnxscript>=0.3",
        "onnxruntime>=1.18",
        "matplotlib>=3.7",  # ftl explain's PNGs, ftl bench's plot
        "pillow>=9.0",  # TensorBoard images (the confusion matrix)
        # `ftl bench`: the Hugging Face Trainer baseline needs accelerate; host RSS, psutil
        "accelerate>=0.26",
        "psutil>=5.9",
    ],
    extras_require={
        # the test suite exercises the trackers for real (MLflow's SQLite store, W&B offline) and drives
        # `ftl serve`'s OpenAI-compatible endpoints with the official openai client
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "peft>=0.13", "mlflow-skinny>=2.16", "sqlalchemy>=2.0",
                 "alembic>=1.13", "wandb>=0.19", "openai>=1.40"],
        "lora": ["peft>=0.13"],  # model.lora_rank
        # run.report_to: mlflow (the client, and what its default SQLite store needs), wandb
        "mlflow": ["mlflow-skinny>=2.16", "sqlalchemy>=2.0", "alembic>=1.13"],
        "wandb": ["wandb>=0.19"],
    },
    entry_points={"console_scripts": ["ftl=engine.cli:main"]},
    # `ftl slurm` fills these templates; a non-editable install finds them under <prefix>/share.
    data_files=[("share/ftl-engine/launch/slurm",
                 ["launch/slurm/train.sbatch", "launch/slurm/train_deepspeed.sbatch", "launch/slurm/sweep.sbatch"])],
)
