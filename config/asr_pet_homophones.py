# PET on the homophone corpus: the same two runs as config/asr_pet.py, on a corpus whose slots hold words that
# start with a character sounding like the first character of others in the same slot (市场 事务所 试卷 视频 ...):
# the recogniser must guess at the first syllable, and PET's claim is that a wrong guess derails the next
# character less when the prediction network embeds it by its sound.
#   python data/speech/prepare.py --lexicon=data/speech/lexicon.tsv,data/speech/lexicon_homophones.tsv \
#       --out_dir=data/speech_homophones                 # the corpus (2 min)
#   python train_asr.py config/asr_pet_homophones.py     # two runs, about 11 minutes on 2 cores
data_dir = 'data/speech_homophones'
out_dir = 'out-asr-pet-h'
runs = 'char,char+pet'
