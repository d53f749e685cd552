# PET on the long-tail corpus: the same two runs as config/asr_pet.py, on a corpus whose slots hold twice the
# words, drawn by a Zipf law (the long tail of rare characters, many sounding like common ones, where
# pronunciation-aware embeddings are to share what the rare ones cannot learn alone).
#   python data/speech/prepare.py --lexicon=data/speech/lexicon.tsv,data/speech/lexicon_longtail.tsv --zipf=1.2 \
#       --out_dir=data/speech_longtail                   # the corpus (1 min)
#   python train_asr.py config/asr_pet_longtail.py       # two runs, about 11 minutes on 2 cores
data_dir = 'data/speech_longtail'
out_dir = 'out-asr-pet-lt'
runs = 'char,char+pet'
