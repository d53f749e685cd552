# Romanization encoding (FastConformer-RNNT on Mandarin-English code-switching): the same transducer
# trained for the same steps on the same batches with Mandarin written as characters (the baseline) and
# as tonal pinyin pieces, turned back into characters by Roman2Char (trained on text alone).
#   python data/speech/prepare.py && python romanize.py        # the corpus (3 min), Roman2Char (10 s)
#   python train_asr.py config/asr_romanization.py              # two runs, about 11 minutes on 2 cores
out_dir = 'out-asr'
runs = 'char,roman'
