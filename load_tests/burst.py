"""Locustfile: steady traffic whose user count jumps tenfold for the middle third of the run."""

from locust import LoadTestShape

from load_tests.users import SteadyUser  # noqa: F401

BURST_FACTOR = 10


class BurstShape(LoadTestShape):
    """``-u`` users, then ``10 * -u`` users (spawned within a second), then ``-u`` again;
    each phase lasts a third of ``-t``."""

    use_common_options = True  # -u and -t are read in tick()

    def tick(self):
        options = self.runner.environment.parsed_options
        run_time, users = options.run_time, options.num_users
        elapsed = self.get_run_time()
        if elapsed >= run_time:
            return None
        burst = run_time / 3 <= elapsed < 2 * run_time / 3
        count = users * BURST_FACTOR if burst else users
        return count, float(count)
