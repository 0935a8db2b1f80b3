"""Statistics over repeated runs (e.g. FIDs of six discriminator trainings).

Reports mean, standard deviation, standard error, a bootstrap confidence
interval, a one-sample t-test against --baseline, and Welch's t-test (plus a
paired test with --paired) between --a and --b.

\b
  python stats.py --a=runs_dg.csv --baseline=1.96
  python stats.py --a=fid_dg.csv --b=fid_plain.csv --paired
"""


import click

from edm_dg import stats
from edm_dg.fileio import atomic_write_json

@click.command(help=__doc__)
@click.option('--a', 'a_path', help='Values of group A (CSV or JSON)', metavar='PATH', required=True)
@click.option('--b', 'b_path', help='Values of group B (CSV or JSON)', metavar='PATH', default=None)
@click.option('--column', help='CSV column (header row) / JSON key holding the values', default='fid', show_default=True)
@click.option('--baseline', help='Value for the one-sample t-test (e.g. 1.96)', type=float, default=None)
@click.option('--paired', help='Also a paired t-test (same seeds in A and B)', is_flag=True)
@click.option('--confidence', help='Bootstrap confidence level', type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95, show_default=True)
@click.option('--seed', help='Bootstrap seed', type=int, default=0, show_default=True)
@click.option('--json', 'json_out', help='Write the report as JSON', metavar='PATH', default=None)
def main(a_path, b_path, column, baseline, paired, confidence, seed, json_out):
    try:
        a = stats.read_values(a_path, column, '--a')
        b = stats.read_values(b_path, column, '--b') if b_path else None
        r = stats.report(a, b, baseline, confidence, seed, paired)
    except ValueError as e:
        raise click.ClickException(str(e))
    for g in ('a', 'b'):
        if g in r:
            s = r[g]
            print(f'{g.upper()}: n={s["n"]} mean={s["mean"]:.4f} std={s["std"]:.4f} se={s["se"]:.6f} '
                  f'{int(confidence * 100)}% CI [{s["ci"]["low"]:.4f}, {s["ci"]["high"]:.4f}]')
    if 'one_sample' in r:
        o = r['one_sample']
        print(f'one-sample t-test vs {o["baseline"]}: t={o["t"]:.3f} (df={o["df"]}) p={o["p"]:.3g}')
    if 'welch' in r:
        print(f'Welch t-test A vs B: t={r["welch"]["t"]:.3f} p={r["welch"]["p"]:.3g}')
    if 'paired' in r:
        print(f'paired t-test A vs B: t={r["paired"]["t"]:.3f} p={r["paired"]["p"]:.3g}')
    if json_out:
        try:
            atomic_write_json(json_out, r, indent=2)
        except OSError as e:
            raise click.ClickException(f'{json_out}: cannot write the report ({e.strerror or type(e).__name__}); choose another --json')

if __name__ == '__main__':
    main()
