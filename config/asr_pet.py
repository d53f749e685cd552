# PET, pronunciation-aware embeddings (arXiv:2404.04295): the character transducer with its prediction
# network's embeddings as they are, and composed from the token, its syllable, tone, initial and final.
#   python data/speech/prepare.py                        # the corpus (3 min)
#   python train_asr.py config/asr_pet.py                # two runs, about 11 minutes on 2 cores
out_dir = 'out-asr-pet'
runs = 'char,char+pet'
