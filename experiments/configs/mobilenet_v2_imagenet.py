"""AMC (He et al., ECCV 2018) on MobileNet-V2 / ImageNet at 70% of the MACs: 71.8 -> 70.8 top-1.

As mobilenet_v1_imagenet.py: a trained baseline (SGD 0.1 per 256 images, weight decay 4e-5, 5 warm-up epochs,
cosine over 150 epochs), AMC's DDPG search (400 episodes, 100 of warm-up, rounding to 8, least squares, 3,000
reward images) at 70% of the MACs, 30 fine-tuning epochs at 0.01 (ours). Run: `agmc reproduce
experiments/configs/mobilenet_v2_imagenet.py --workdir runs/amc_mobilenet_v2 --data-dir DIR`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "published": {"paper": "AMC (He et al., ECCV 2018)", "metric": "top-1 (%)", "dense": 71.8,
                      "compressed": 70.8, "budget": "70% MACs"},
        "train": {"model": "mobilenet_v2", "dataset": "imagenet2012", "epochs": 150, "batch_size": 256,
                  "learning_rate": 0.1, "weight_decay": 4e-5, "schedule": "cosine", "warmup_epochs": 5, "seed": 0,
                  "input_shape": None, "model_kwargs": {"width": 1.0}},
        "compress": {"method": "amc", "target_macs": 0.7, "episodes": 400, "warmup_episodes": 100,
                     "reward": "acc", "reward_images": 3000, "lbound": 0.2, "round_to": 8, "criterion": "lstsq",
                     "rerank": 0, "finetune_epochs": 30, "lr": 0.01, "seed": 0},
    })
