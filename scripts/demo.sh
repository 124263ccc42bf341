#!/usr/bin/env bash
# Sets everything up and runs sbertray end to end on the bundled defaults: a local Ray, the
# bundled all-MiniLM-L6-v2, the shipped sample data, local storage under runs/.
#   1. fine-tune on course title <-> category pairs (seed 000's recipe, sample data)
#   2. embed the sample course shards with the fine-tuned model, top-3 categories per course
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # local Ray on 127.0.0.1
SB=.venv/bin/sbertray

$SB train jobs/configs/courses.yaml
$SB embed jobs/configs/embed_demo.yaml model=runs/courses/model output.path=runs/embed_demo
.venv/bin/python - <<'PY'
import duckdb
print(duckdb.sql("""
    select c.title, k.name as best_category, round(e.topk_scores[1], 3) as score
    from read_parquet('runs/embed_demo/**/*.parquet', hive_partitioning=true) e
    join read_parquet('jobs/samples/courses/**/*.parquet', hive_partitioning=true) c
      on c.course_id = e.id
    join read_parquet('jobs/samples/course_categories.parquet') k
      on k.category_id = e.topk_ids[1]
    order by e.id limit 10"""))
PY
