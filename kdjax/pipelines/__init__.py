"""kdjax.pipelines."""
