from sb3_blpo.blpo.blpo import BLPO
from sb3_blpo.blpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

__all__ = ["BLPO", "CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
