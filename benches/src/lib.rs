//! Load-bench support: a closed-loop HTTP load generator with latency percentiles.
