"""Task samplers and dataset readers. Produces episodes; knows nothing of training."""

from tasks.base import Episode, TaskSampler, TaskSplits, episode_generator, sample_episodes
from tasks.few_shot import FewShotSampler, split_classes
from tasks.synthetic import SinusoidSampler

__all__ = [
    "Episode",
    "FewShotSampler",
    "SinusoidSampler",
    "TaskSampler",
    "TaskSplits",
    "episode_generator",
    "sample_episodes",
    "split_classes",
]
