"""Training folders of 4,000, 20,000 and 50,000 images for bench/scale.sh: hard links to the
mirror's 2,000 training images under new names, with 20 validation and 20 test images per class.
Usage: python3 bench/make_scale.py MIRROR_DATA_DIR OUT_DIR"""
import os
import sys

src, out = sys.argv[1], sys.argv[2]
for n in (4000, 20000, 50000):
    root = f'{out}/n{n}'
    for cls, stem in (('cats', 'cat'), ('dogs', 'dog')):
        files = sorted(os.listdir(f'{src}/train/{cls}'))
        d = f'{root}/train/{cls}'
        os.makedirs(d, exist_ok=True)
        for i in range(n // 2):
            dst = f'{d}/{stem}.{i}.jpg'
            if not os.path.exists(dst):
                os.link(f'{src}/train/{cls}/{files[i % len(files)]}', dst)
        for split in ('validation', 'test'):
            d = f'{root}/{split}/{cls}'
            os.makedirs(d, exist_ok=True)
            for f in sorted(os.listdir(f'{src}/{split}/{cls}'))[:20]:
                if not os.path.exists(f'{d}/{f}'):
                    os.link(f'{src}/{split}/{cls}/{f}', f'{d}/{f}')
    print(n, sum(len(fs) for _, _, fs in os.walk(root)), 'files in', root)
