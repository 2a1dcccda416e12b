"""Two-stage DRL (PPO pruning with information dropout) on VGG-16 / CIFAR-10 at 49% of the MACs:
93.46 -> 93.80 top-1 (error 6.54 -> 6.20, 88.6% of the parameters pruned), its Table 1.

The paper trains with SGD and momentum from lr 0.1, batch 128 per GPU; it gives no epoch count, so the baseline
runs 160 cosine epochs with weight decay 5e-4 (the usual CIFAR VGG recipe). Pruning is its first stage: PPO
over the layers, channels chosen by information dropout, the accuracy-and-FLOPs reward; fine-tuning 40 epochs
at 0.02 (ours: the paper fine-tunes inside its loop). Run: `agmc reproduce experiments/configs/vgg16_cifar10.py
--workdir runs/drl_vgg16`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "published": {"paper": "Two-stage DRL (PPO + information dropout)", "metric": "top-1 (%)", "dense": 93.46,
                      "compressed": 93.80, "budget": "49.1% MACs, 11.4% parameters"},
        "train": {"model": "vgg16", "dataset": "cifar10", "epochs": 160, "batch_size": 128, "learning_rate": 0.1,
                  "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0, "seed": 0,
                  "input_shape": None},
        "compress": {"method": "ppo", "target_macs": 0.49, "episodes": 400, "reward": "acc_flops",
                     "reward_images": 5000, "lbound": 0.1, "round_to": 8, "criterion": "infodrop",
                     "rerank": 0, "finetune_epochs": 40, "lr": 0.02, "seed": 0},
    })
