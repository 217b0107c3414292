"""Placement settings of the serve config: custom resources, per-expert overrides, the route prefix."""

from __future__ import annotations

import pytest

from see_ray.config import ConfigError
from see_ray.config.serve import ServeConfig


def test_per_expert_settings_override_only_what_they_name():
    c = ServeConfig.from_yaml(None, ["expert.num_gpus=1", "expert.autoscaling.max_replicas=3",
                                     "per_expert.hot.autoscaling.max_replicas=8",
                                     "per_expert.pinned.resources.see_node_b=1"])
    hot, pinned, other = c.expert_settings("hot"), c.expert_settings("pinned"), c.expert_settings("other")
    assert other == c.expert
    assert hot.autoscaling.max_replicas == 8 and hot.num_gpus == 1  # the rest comes from `expert`
    assert pinned.autoscaling.max_replicas == 3
    opts = pinned.actor_options()
    assert opts["resources"] == {"see_node_b": 1.0} and opts["num_gpus"] == 1.0
    assert "resources" not in other.actor_options()
    # a dump validates back to the same settings (replicas receive the config as a dict)
    assert ServeConfig.model_validate(c.model_dump()) == c


@pytest.mark.parametrize("override, message", [
    ("per_expert.x.resources.GPU=1", "resources.GPU: use num_cpus / num_gpus"),
    ("expert.resources.see_a=-1", "resources.see_a: must be >= 0"),
    ("per_expert.x.num_gpu=1", "per_expert.x.num_gpu"),
    ("route_prefix=v1", "route_prefix"),
])
def test_bad_placement_settings_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        ServeConfig.from_yaml(None, [override])
    assert message in str(e.value)


def test_url_includes_the_route_prefix():
    from see_ray.serve import url_of

    assert url_of(ServeConfig()) == "http://127.0.0.1:8000"
    assert url_of(ServeConfig(route_prefix="/team-a", port=9000)) == "http://127.0.0.1:9000/team-a"


def test_adaptive_batch_wait_waits_only_under_load():
    """A lone request runs at once; after a batch of several, the next batch waits batch.wait_s to fill."""
    from see_ray.serve.replica import ModelReplica

    class Method:  # stands in for a @serve.batch method's setter
        wait = None

        def set_batch_wait_timeout_s(self, s):
            self.wait = s

    replica, m = ModelReplica(), Method()
    replica.scfg = ServeConfig.from_yaml(None, ["batch.wait_s=0.05"])
    replica._adapt_wait(m, 3)
    assert m.wait == 0.05
    replica._adapt_wait(m, 1)
    assert m.wait == 0.0
    replica.scfg = ServeConfig.from_yaml(None, ["batch.wait_s=0.05", "batch.adaptive_wait=false"])
    m.wait = None
    replica._adapt_wait(m, 3)
    assert m.wait is None  # fixed wait: serve.batch keeps the configured timeout
