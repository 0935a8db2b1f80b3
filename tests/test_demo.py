"""The demo pipeline at toy size: every stage runs and the report has its parts."""

import os
import re
import sys

from helpers import run_cli

def test_toy_demo(tmp_path):
    out = tmp_path / 'demo-out'
    p = run_cli([sys.executable, '-m', 'edm_dg.demo', f'--outdir={out}', '--toy', '--sets=2'], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith('Demo done in') and 'FID plain' in last and 'paired p=' in last
    report = (out / 'report.md').read_text()
    for section in ('## FID, plain EDM vs. EDM + DG (same seeds)', '## Samples', '## Discriminator training',
                    '## FID against discriminator epoch', '## Stage times', '**Verdict:**', '**FID features.**'):
        assert section in report, section
    assert len(re.findall(r'^\| [12] \| \d+-\d+ \| [\d.]+ \| [\d.]+ \|', report, re.M)) == 2
    assert 'mean +- std' in report and 'Paired t-test' in report
    for f in ('samples-plain-vs-dg.png', 'disc/training-curves.png', 'fid-epochs/fid_epochs.png', 'fid-epochs/fid_epochs.csv',
              'disc/metrics.jsonl', 'ref.npz', 'stats.json', 'fid_plain.csv', 'fid_dg.csv', 'models/base-edm-digits.pkl',
              'models/classifier-digits.pt', 'models/fid-digits-cnn.pt', 'data/dataset.json'):
        assert os.path.isfile(out / f) and os.path.getsize(out / f) > 0, f
    for link in re.findall(r'\]\(([^)]+)\)', report):
        assert os.path.isfile(out / link), link
    # Each stage printed its time.
    assert len(re.findall(r'^=== .*: [\d.]+s$', p.stdout, re.M)) >= 8
