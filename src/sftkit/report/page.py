"""report.html: one self-contained file (inline CSS, plots as base64 PNGs) that opens anywhere."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

import jinja2

from sftkit.report import summary
from sftkit.report.evaluation import evaluation_section
from sftkit.report.read import RunRecord

PAGE = jinja2.Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>sftkit report · {{ name }}</title>
<style>
  body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2430;
         margin: 0; background: #f4f6f9; }
  main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
  h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px; }
  h3 { font-size: 14px; margin: 16px 0 6px; }
  .sub { color: #5b6575; margin-bottom: 16px; word-break: break-all; }
  .card { background: #fff; border: 1px solid #dde2ea; border-radius: 8px; padding: 14px 16px; }
  .badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-weight: 600; font-size: 13px; }
  .finished, .early_stopped { background: #d9f2e1; color: #17633a; } .running { background: #dbe9fb; color: #174f8f; }
  .crashed { background: #fbdcdc; color: #8c1c1c; } .stopped, .unknown { background: #ece6d6; color: #6a5414; }
  .headline { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; }
  .headline div { background: #fff; border: 1px solid #dde2ea; border-radius: 8px; padding: 8px 12px; }
  .headline b { display: block; font-size: 12px; color: #5b6575; font-weight: 500; }
  .headline span { font-size: 17px; font-weight: 600; }
  .notes { background: #fff8e1; border: 1px solid #f0d78c; border-radius: 8px; padding: 8px 16px; margin-top: 12px; }
  .facts { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 14px; align-items: start; }
  .facts .card:first-child { grid-row: span 2; }  /* config on the left, data and schedule stacked right */
  .plots { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
  @media (max-width: 960px) { .facts, .plots { grid-template-columns: 1fr; } }
  .plots .wide { grid-column: 1 / -1; }
  .plots img { width: 100%; height: auto; display: block; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; vertical-align: top; padding: 5px 8px; border-bottom: 1px solid #e8ebf0; }
  th { font-size: 12px; color: #5b6575; font-weight: 600; }
  td.key { color: #5b6575; white-space: nowrap; width: 1%; padding-right: 18px; }
  td.num { white-space: nowrap; width: 1%; } td { overflow-wrap: break-word; }
  td.text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
            font-size: 12.5px; }
  .kind { font-family: ui-monospace, monospace; font-weight: 600; color: #8c4a00; white-space: nowrap; }
  .advice { color: #3b4657; }
  .yes { color: #17633a; } .no { color: #8c1c1c; }
  .empty { color: #5b6575; font-style: italic; }
  footer { margin-top: 32px; color: #8a93a3; font-size: 12px; }
</style></head>
<body><main>
<h1>{{ name }} <span class="badge {{ status }}">{{ status }}</span></h1>
<div class="sub">{{ run_dir }}{% if model %} · {{ model }}{% endif %}</div>
<div class="headline">{% for label, value in headline -%}
<div><b>{{ label }}</b><span>{{ value }}</span></div>{% endfor %}</div>
{% if notes %}<div class="notes"><b>Incomplete run directory</b><ul>{% for note in notes -%}
<li>{{ note }}</li>{% endfor %}</ul></div>{% endif %}

<h2>Diagnosis</h2>
<div class="card">{% if findings %}<table><tr><th>step</th><th>kind</th><th>what happened</th><th>what to do</th></tr>
{% for f in findings %}<tr><td class="num">{{ f.step }}</td><td class="kind">{{ f.kind }}</td><td>{{ f.message }}</td>
<td class="advice">{{ f.advice }}</td></tr>{% endfor %}</table>
{% else %}<span class="empty">No problems detected.</span>{% endif %}</div>

{% if evaluation %}<h2>Evaluation</h2>
<p class="sub">{{ evaluation.facts }}: the 95% interval is a paired bootstrap over the examples; one that
excludes 0 is a difference these examples can tell from noise.</p>
<div class="card"><table><tr>{% for c in evaluation.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in evaluation.rows %}<tr>{% for c in evaluation.columns %}<td{% if not loop.first %} class="num"{% endif %}>
{{ row[c] }}</td>{% endfor %}</tr>{% endfor %}</table></div>
{% if evaluation.metric %}<div class="plots" style="margin-top: 14px">
{% for title, side in (("Where tuned beats base", evaluation.wins), ("Where tuned loses to base", evaluation.losses)) %}
<div class="card"><h3>{{ title }} ({{ evaluation.metric }})</h3>{% if side %}{% for ex in side %}
<table style="margin-bottom: 10px"><tr><td class="key">prompt</td><td class="text">{{ ex.prompt }}</td></tr>
<tr><td class="key">reference</td><td class="text">{{ ex.reference }}</td></tr>
<tr><td class="key">base</td><td class="text">{{ ex.base }}</td></tr>
<tr><td class="key">tuned</td><td class="text">{{ ex.tuned }}</td></tr></table>{% endfor %}
{% else %}<span class="empty">none</span>{% endif %}</div>{% endfor %}</div>{% endif %}
{% endif %}

<h2>Curves</h2>
<div class="plots">{% for title, image in plots %}<div class="card{% if title in wide_plots %} wide{% endif %}">
<img alt="{{ title }}" src="data:image/png;base64,{{ image }}"></div>{% endfor %}</div>

<h2>Samples</h2>
{% if samples %}<p class="sub">The same prompts generated at each sample step: outputs should become on-topic and end
with the end-of-turn token.</p>
{% for prompt, rows in samples %}<div class="card" style="margin-bottom: 12px"><h3>{{ prompt }}</h3>
<table><tr><th>step</th><th>ended</th><th>completion</th></tr>{% for s in rows %}<tr><td class="num">{{ s.step }}</td>
<td class="num {{ 'yes' if s.ended else 'no' }}">{{ 'yes' if s.ended else 'no' }}</td>
<td class="text">{{ s.completion }}</td></tr>{% endfor %}</table></div>{% endfor %}
{% else %}<div class="card empty">No samples were generated (yet).</div>{% endif %}

<h2>Checkpoints</h2>
<div class="card">{% if checkpoints %}<table><tr><th>folder</th><th>step</th><th>note</th></tr>
{% for c in checkpoints -%}
<tr><td class="num">{{ c.name }}</td><td class="num">{{ c.step }}</td><td>{{ c.note }}</td></tr>{% endfor %}
</table>{% else %}<span class="empty">No checkpoints saved (yet).</span>{% endif %}</div>

<h2>Run</h2>
<div class="facts">{% for title, rows in facts %}<div class="card"><h3>{{ title }}</h3>
{% if rows %}<table>{% for key, value in rows -%}
<tr><td class="key">{{ key }}</td><td>{{ value }}</td></tr>{% endfor %}</table>
{% else %}<span class="empty">not recorded</span>{% endif %}</div>{% endfor %}</div>
<footer>Written by <code>sftkit report</code> at {{ written_at }}.</footer>
</main></body></html>
""",
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


WIDE_PLOTS = ("Loss", "Task metric")  # the curves a reader looks at first, across the page


def render_page(record: RunRecord, plots: dict[str, bytes]) -> str:
    return PAGE.render(
        name=record.run_dir.resolve().name,
        run_dir=str(record.run_dir),
        status=record.status,
        model=record.run.get("model_name_or_path") or record.config.get("model_name_or_path"),
        headline=summary.headline_rows(record),
        notes=record.notes,
        findings=record.findings,
        evaluation=evaluation_section(record),
        plots=[(title, base64.b64encode(png).decode("ascii")) for title, png in plots.items()],
        wide_plots=WIDE_PLOTS,
        samples=list(summary.samples_by_prompt(record).items()),
        checkpoints=summary.checkpoint_rows(record),
        facts=summary.fact_sections(record),
        written_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
