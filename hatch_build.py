"""Ship the Julia sources inside the standard wheel (``mfres/jl``, ``mfres/Project.toml``).

Only for the standard wheel: in an editable install the package reads the
checkout's own ``jl/``, and a force-included copy would be a stale snapshot.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["jl"] = "mfres/jl"
            build_data["force_include"]["Project.toml"] = "mfres/Project.toml"
