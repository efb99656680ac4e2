"""What `rag-bench` runs (an installed command needs installed code); the experiments themselves live in bench/."""
